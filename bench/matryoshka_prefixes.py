"""BatchTopK vs Matryoshka BatchTopK on the synthetic superposition benchmark: the whole dictionary, and what its
first latents alone reconstruct.

    python -m bench.matryoshka_prefixes --samples 20000 --steps 400 --seed 0

The synthetic command's data and settings (d=64, 512 true features, mean L0 8, k=8, 1,024 latents, lr 2e-3,
batch 1,024), both kinds trained alike; each row prints run_benchmark's figures (FVU, recovery, L0, dead) plus
the held-out FVU when decoding only the first 64 latents (Matryoshka's first prefix, 1024/16) and the first 256.
A Matryoshka dictionary should give up a little on the whole and win on its prefixes.
"""
from __future__ import annotations

import argparse
import json

import torch

from sae_core.config import DictionaryConfig, TrainConfig
from sae_core.kernels import SparseCodes
from sae_core.synthetic import run_benchmark, superposition_data

PREFIXES = (64, 256)


def prefix_fvu(sae, test: torch.Tensor, first: int) -> float:
    """Held-out FVU of the reconstruction from latents ``0..first-1`` only (the others' codes set to 0)."""
    with torch.no_grad():
        codes = sae.encode(test)
        recon = sae.decode(SparseCodes(codes.values * (codes.indices < first), codes.indices))
    return float((recon - test).pow(2).sum() / (test - test.mean(0)).pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = superposition_data(n_samples=args.samples, d=64, n_features=512, mean_l0=8.0, seed=args.seed)
    config = TrainConfig(DictionaryConfig(k=8, n_latents=1024, normalization="none"), total_steps=args.steps,
                         batch_size=1024, warmup_steps=50, lr=2e-3, dead_tokens=50_000, loss_threshold=0.25,
                         seed=args.seed, log_every=25)
    keep: dict = {}
    rows = run_benchmark(("batchtopk", "matryoshka_batchtopk"), data, config, keep=keep)
    test = data.x[int(args.samples * 0.9):]
    for row in rows:
        sae = keep[row["kind"]].dictionary.eval()
        for first in PREFIXES:
            row[f"fvu_first_{first}"] = prefix_fvu(sae, test, first)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
