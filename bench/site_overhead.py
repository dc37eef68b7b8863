"""Per-step cost of capturing and steering at a Flux site, against the unpatched model.

    python -m bench.site_overhead                       # full-size Flux block stack, bf16, GPU
    python -m bench.site_overhead --small --device cpu  # smoke run of the same code

One "step" is one forward of a random-weight ``FluxTransformer2DModel`` (the
denoiser call a sampler makes per step; 1024x1024 -> 4096 image + 512 text
tokens). Rows, measured in one process: unpatched; capture of one double
block's image tokens (every token copied to host memory); steering that block
by adding 2 features; steering by clamping 2 features (encode + edit, error
kept). Target: at most 3 % over the unpatched step.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from bench.timing import device_name, timed, write_rows
from sae_core import Site, SiteContext, SparseAutoencoder, Steer, steer_function

FULL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
SMALL = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
             axes_dims_rope=(4, 6, 6))



def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--small", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--latents", type=int, default=16384, help="dictionary width for the steering rows")
    parser.add_argument("--block", type=int, default=18)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from diffusers import FluxTransformer2DModel  # heavy import, only when run

    from training.adapters import attach

    config = SMALL if args.small else FULL
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    block = min(args.block, config["num_layers"] - 1)
    grid, text = (4, 4) if args.small else (64, 64), 8 if args.small else 512
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).to(dtype).eval()
    n_img = grid[0] * grid[1]
    ids = torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"), -1).reshape(-1, 2)
    inputs = dict(
        hidden_states=torch.randn(1, n_img, config["in_channels"], device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], device=device, dtype=dtype),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=torch.cat([torch.zeros(n_img, 1), ids.float()], -1).to(device),
        txt_ids=torch.zeros(text, 3, device=device),
        return_dict=False,
    )
    d = config["num_attention_heads"] * config["attention_head_dim"]
    site = Site("flux", f"double_blocks.{block}", "image")
    sae = SparseAutoencoder(d, args.latents if not args.small else 64, 32 if not args.small else 4).to(device)
    captured: list[torch.Tensor] = []

    def capture(h: torch.Tensor, ctx: SiteContext) -> torch.Tensor:
        captured.append(h.to("cpu", non_blocking=True))
        return h

    functions = {
        "unpatched": None,
        "capture (all image tokens to host)": capture,
        "steer: add 2 features": steer_function(sae, [Steer((1, 2), (0.8, 0.8), cond_only=False)]),
        "steer: clamp 2 features": steer_function(sae, [Steer((1, 2), (2.0, 2.0), mode="clamp", units="raw", cond_only=False)]),
    }
    def step() -> None:
        captured.clear()
        model(**inputs)

    rows = []
    with torch.no_grad():
        for name, fn in functions.items():
            with attach(model, {site: fn}) if fn is not None else contextlib.nullcontext():
                rows.append({"name": name, "seconds": timed(step, device, args.warmup, args.iters)})
    base = rows[0]["seconds"]
    print(f"Flux step ({'small' if args.small else 'full-size'}, {n_img}+{text} tokens, {args.dtype}) on {device_name(device)}; site {site}")
    print(f"{'':<36} {'ms/step':>9} {'overhead':>9}")
    for row in rows:
        row["overhead"] = row["seconds"] / base - 1
        print(f"{row['name']:<36} {row['seconds'] * 1e3:>9.2f} {100 * row['overhead']:>8.1f}%")
    write_rows(args.json, args, rows, device)
    return rows


if __name__ == "__main__":
    main()
