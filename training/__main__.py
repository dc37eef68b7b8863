"""``python -m training``: the headless trainer's command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from sae_core import DictionaryError, TrainConfig, save_dictionary
from sae_core.metrics import firing_histogram
from sae_core.plots import histogram_chart, line_chart
from sae_core.synthetic import run_benchmark, superposition_data


def tqdm_progress(desc: str, total: int):
    """A training progress callback that drives a tqdm bar."""
    bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def update(step: int, total_steps: int, metrics: dict) -> None:
        bar.update(step - bar.n)
        if "fvu" in metrics:
            bar.set_postfix(fvu=f"{metrics['fvu']:.3f}")
        elif "atoms" in metrics:
            bar.set_postfix(atoms=metrics["atoms"], loss=f"{metrics['relative_loss']:.3f}")
        if step >= total_steps:
            bar.close()

    return update


def cmd_synthetic(args: argparse.Namespace) -> int:
    data = superposition_data(n_samples=args.samples, d=args.d, n_features=args.features, mean_l0=args.l0, seed=args.seed)
    config = TrainConfig(k=args.k, n_latents=args.latents or 2 * args.features, total_steps=args.steps,
                         batch_size=args.batch_size, warmup_steps=50, lr=args.lr, dead_tokens=50_000,
                         normalization="none", loss_threshold=args.loss_threshold, seed=args.seed, log_every=25)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = {}
    rows = run_benchmark(tuple(args.kinds), data, config, tqdm_progress, keep=trained)
    for kind, result in trained.items():
        save_dictionary(result.dictionary, out / f"{kind}.safetensors")
        edges, counts = firing_histogram(result.dictionary.firing_frequency)
        histogram_chart(edges, counts, f"{kind}: latent firing frequency", "log10 frequency").save(out / f"{kind}_firing.png")
    curves = {kind: [(h["step"], h["fvu"]) for h in result.history] for kind, result in trained.items() if kind != "itda"}
    line_chart(curves, "training FVU (synthetic superposition)", log_y=True).save(out / "training_curves.png")
    (out / "metrics.json").write_text(json.dumps(rows, indent=2))

    print(f"synthetic superposition: d={args.d}, {args.features} true features, mean L0 {args.l0}, {args.samples} samples")
    print(f"{'kind':<10} {'latents':>8} {'L0':>6} {'FVU':>7} {'recovery':>9} {'dead':>6} {'seconds':>8}")
    for r in rows:
        print(f"{r['kind']:<10} {r['latents']:>8} {r['l0']:>6.2f} {r['fvu']:>7.4f} {r['recovery']:>9.4f} {r['dead_fraction']:>6.3f} {r['seconds']:>8.1f}")
    print(f"dictionaries, curves and metrics.json written to {out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every training report")
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="train TopK, BatchTopK and ITDA on the synthetic superposition benchmark")
    syn.add_argument("--kinds", nargs="+", default=["topk", "batchtopk", "itda"], choices=["topk", "batchtopk", "itda"])
    syn.add_argument("--samples", type=int, default=50_000)
    syn.add_argument("--d", type=int, default=64, help="activation width")
    syn.add_argument("--features", type=int, default=512, help="true features (more than --d: superposition)")
    syn.add_argument("--l0", type=float, default=8.0, help="mean active true features per sample")
    syn.add_argument("--k", type=int, default=8, help="dictionary L0 (k for SAEs, target L0 for ITDA)")
    syn.add_argument("--latents", type=int, default=None, help="SAE width (default 2 x features)")
    syn.add_argument("--steps", type=int, default=1500)
    syn.add_argument("--batch-size", type=int, default=1024)
    syn.add_argument("--lr", type=float, default=2e-3)
    syn.add_argument("--loss-threshold", type=float, default=0.25, help="ITDA growth threshold")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--out", default="runs/synthetic")
    syn.set_defaults(func=cmd_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except DictionaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
