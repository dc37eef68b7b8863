"""A synthetic superposition benchmark with a known answer.

Activations are sparse non-negative combinations of ``n_features`` random unit
directions in ``d < n_features`` dimensions (superposition), with power-law
feature frequencies as in real models. A dictionary that learned the true
features has, for every true feature, a direction with cosine near 1: the
*feature recovery* score is the mean of those maximum cosines.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .metrics import evaluate


@dataclass
class SyntheticData:
    x: Tensor
    """(N, d) activations."""
    features: Tensor
    """(n_features, d) unit-norm ground-truth directions."""
    frequency: Tensor
    """(n_features,) probability that each feature is active on a token."""


def superposition_data(
    n_samples: int = 50_000,
    d: int = 64,
    n_features: int = 512,
    mean_l0: float = 8.0,
    power: float = 0.5,
    noise: float = 0.01,
    seed: int = 0,
) -> SyntheticData:
    """Sample ``x = sum_i a_i f_i + noise`` with ``P(a_i > 0) ∝ (i+1)^-power``."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=gen)
    features /= features.norm(dim=-1, keepdim=True)
    p = (torch.arange(n_features) + 1.0).pow(-power)
    p = (p * mean_l0 / p.sum()).clamp(max=1.0)
    active = torch.rand(n_samples, n_features, generator=gen) < p
    magnitude = 0.5 + torch.rand(n_samples, n_features, generator=gen)
    codes = (active * magnitude).to_sparse()
    x = torch.sparse.mm(codes, features) + noise * torch.randn(n_samples, d, generator=gen)
    return SyntheticData(x, features, p)


def feature_recovery(directions: Tensor, features: Tensor) -> float:
    """Mean over true features of the best cosine with any learned direction."""
    a = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = features.float() / features.float().norm(dim=-1, keepdim=True)
    return float((b @ a.T).max(dim=1).values.mean())


def run_benchmark(
    kinds: tuple[str, ...] = ("topk", "batchtopk", "itda"),
    data: SyntheticData | None = None,
    config=None,
    progress_factory=None,
    keep: dict | None = None,
) -> list[dict]:
    """Train each kind at the same L0 on the same data; report recovery and FVU on held-out data.

    ``keep``, if given, receives each kind's TrainResult."""
    from .config import DictionaryConfig, TrainConfig
    from .train import train_dictionary

    data = data or superposition_data()
    n_train = int(data.x.shape[0] * 0.9)
    train_x, test_x = data.x[:n_train], data.x[n_train:]
    base = config or TrainConfig(DictionaryConfig(k=8, n_latents=data.features.shape[0] * 2, normalization="none"),
                                 total_steps=1500, batch_size=1024, warmup_steps=50, lr=2e-3, dead_tokens=50_000,
                                 loss_threshold=0.25, log_every=100)
    rows = []
    for kind in kinds:
        cfg = replace(base, dictionary=replace(base.dictionary, kind=kind))
        if kind == "itda":
            cfg = replace(cfg, total_steps=max(1, n_train // cfg.batch_size))
        progress = progress_factory(kind, cfg.total_steps) if progress_factory else None
        start = time.perf_counter()
        result = train_dictionary(train_x, cfg, progress=progress)
        seconds = time.perf_counter() - start
        if keep is not None:
            keep[kind] = result
        dictionary = result.dictionary.eval()
        directions = torch.stack([dictionary.direction(i) for i in range(dictionary.n_latents)])
        metrics = evaluate(dictionary, test_x)
        rows.append({
            "kind": kind,
            "latents": dictionary.n_latents,
            "l0": metrics["l0"],
            "fvu": metrics["fvu"],
            "recovery": feature_recovery(directions, data.features),
            "dead_fraction": metrics["dead_fraction"],
            "seconds": seconds,
        })
    return rows
