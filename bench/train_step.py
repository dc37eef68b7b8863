"""Tokens/s of one SAE training step, beside the matmul floor and a peer library.

    python -m bench.train_step                      # d=3072, n=49152, k=64, bf16, on the GPU
    python -m bench.train_step --small --device cpu # smoke run of the same code

Rows, all measured in one process on the same batch:

* ``matmul floor``: one bf16 encoder matmul per token (``x @ W_enc.T``), the
  work no TopK SAE step can avoid; every other row is reported as a % of it;
* ``sae_core``: our full step (fused encoder with sparse backward,
  embedding-bag decode, AuxK, Adam, decoder renormalisation);
* ``naive``: the same maths in plain dense PyTorch (dense codes, dense decode,
  autograd through everything) — the usual research-code baseline;
* ``eai-sparsify``: EleutherAI sparsify's SparseCoder step, if importable.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from bench.timing import device_name, timed, write_rows
from sae_core.kernels import fused_topk_encode, sparse_decode
from sae_core import SparseAutoencoder



def ours(sae: SparseAutoencoder, x: torch.Tensor, k_aux: int, dtype: torch.dtype) -> Callable[[], None]:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(sae.n_latents, dtype=torch.bool, device=x.device)
    dead[: sae.n_latents // 10] = True  # a realistic share of dead latents for AuxK

    def step() -> None:
        enc = fused_topk_encode(x - sae.b_dec, sae.W_enc, sae.b_enc, sae.k, dead_mask=dead, k_aux=k_aux, compute_dtype=dtype)
        recon = sparse_decode(enc.codes, sae.W_dec) + sae.b_dec
        var = (x - x.mean(0)).pow(2).sum()
        residual = (x - recon).detach()
        aux = (sparse_decode(enc.aux, sae.W_dec) - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
        loss = (recon - x).pow(2).sum() / var + aux / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder_()

    return step


def naive(sae: SparseAutoencoder, x: torch.Tensor, k: int, dtype: torch.dtype) -> Callable[[], None]:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            pre = F.linear(x - sae.b_dec, sae.W_enc, sae.b_enc)
            values, indices = pre.topk(k, dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
            recon = codes @ sae.W_dec + sae.b_dec
        loss = (recon.float() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()

    return step


def sparsify_step(d: int, n: int, k: int, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None] | str:
    try:
        from sparsify.sparse_coder import SparseCoder, SparseCoderConfig
    except Exception as err:  # report why it is missing instead of failing the whole benchmark
        return f"not importable ({type(err).__name__}: {err})"
    coder = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=x.device, dtype=torch.float32)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-4)
    dead = torch.zeros(n, dtype=torch.bool, device=x.device)
    dead[: n // 10] = True

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = coder(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(coder.parameters(), 1.0)
        opt.step()
        coder.set_decoder_norm_to_unit_norm()

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=3072)
    parser.add_argument("--n", type=int, default=49152)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8192, help="batch size in tokens")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="d=64, n=512, k=8, 256 tokens (smoke test)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.small:
        args.d, args.n, args.k, args.tokens = 64, 512, 8, 256
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d, device=device)
    w = torch.randn(args.n, args.d, device=device, dtype=dtype)
    xb = x.to(dtype)
    floor = timed(lambda: F.linear(xb, w), device, args.warmup, args.iters)
    rows = [{"name": "matmul floor", "seconds": floor}]
    del w
    for name, make in [("sae_core", lambda s: ours(s, x, args.d // 2, dtype)), ("naive", lambda s: naive(s, x, args.k, dtype))]:
        sae = SparseAutoencoder(args.d, args.n, args.k).to(device)
        rows.append({"name": name, "seconds": timed(make(sae), device, args.warmup, args.iters)})
        del sae
    peer = sparsify_step(args.d, args.n, args.k, x, dtype)
    rows.append({"name": "eai-sparsify", **({"seconds": timed(peer, device, args.warmup, args.iters)} if callable(peer) else {"note": peer})})

    print(f"SAE training step, d={args.d} n={args.n} k={args.k} tokens={args.tokens} {args.dtype} on {device_name(device)}")
    print(f"{'':<14} {'ms/step':>9} {'Mtok/s':>8} {'% of floor':>11}")
    for row in rows:
        if "seconds" in row:
            row["tokens_per_s"] = args.tokens / row["seconds"]
            row["fraction_of_floor"] = floor / row["seconds"]
            print(f"{row['name']:<14} {row['seconds'] * 1e3:>9.3f} {row['tokens_per_s'] / 1e6:>8.3f} {100 * row['fraction_of_floor']:>10.1f}%")
        else:
            print(f"{row['name']:<14} {row['note']}")
    write_rows(args.json, args, rows, device)
    return rows


if __name__ == "__main__":
    main()
