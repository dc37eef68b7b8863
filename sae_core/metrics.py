"""How good is a dictionary? Reconstruction and sparsity metrics.

* FVU (fraction of variance unexplained) = ||x - x_hat||^2 / ||x - mean(x)||^2
  summed over the batch; 1 - FVU is the explained variance.
* L0: active latents per token. Dead latents: latents that have not fired for
  a window of tokens. Firing frequency: fraction of tokens a latent fires on.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import SparseCodes


def fvu(x: Tensor, x_hat: Tensor) -> float:
    x, x_hat = x.reshape(-1, x.shape[-1]).float(), x_hat.reshape(-1, x.shape[-1]).float()
    total = (x - x.mean(0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total.clamp_min(1e-30))


def mse(x: Tensor, x_hat: Tensor) -> float:
    return float((x.float() - x_hat.float()).pow(2).mean())


def cosine_similarity(x: Tensor, x_hat: Tensor) -> float:
    """Mean per-token cosine between input and reconstruction."""
    x, x_hat = x.reshape(-1, x.shape[-1]).float(), x_hat.reshape(-1, x.shape[-1]).float()
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean())


def mean_l0(codes: SparseCodes) -> float:
    return float((codes.values > 0).sum(-1).float().mean())


class FiringTracker:
    """Per-latent firing statistics, updated batch by batch.

    ``tokens_since_fired`` drives dead-latent detection (AuxK) and the
    dead fraction over a token window; counts and activation sums give the
    firing frequency and the mean activation when firing.
    """

    def __init__(self, n_latents: int, device: str | torch.device = "cpu"):
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.fire_count = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.activation_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, codes: SparseCodes) -> None:
        values = codes.values.detach().reshape(-1, codes.values.shape[-1])
        indices = codes.indices.reshape(-1, codes.indices.shape[-1])
        active = values > 0
        idx = indices[active]
        n = self.fire_count.shape[0]
        self.fire_count += torch.bincount(idx, minlength=n).to(self.fire_count.dtype)
        self.activation_sum.index_add_(0, idx, values[active].to(self.activation_sum.dtype))
        self.tokens_since_fired += values.shape[0]
        self.tokens_since_fired[idx] = 0
        self.tokens += values.shape[0]

    def dead_mask(self, window_tokens: int) -> Tensor:
        return self.tokens_since_fired >= window_tokens

    def dead_fraction(self, window_tokens: int) -> float:
        return float(self.dead_mask(window_tokens).float().mean())

    def firing_frequency(self) -> Tensor:
        return (self.fire_count / max(self.tokens, 1)).float()

    def mean_activation(self) -> Tensor:
        return (self.activation_sum / self.fire_count.clamp_min(1)).float()

    def state(self) -> dict[str, Tensor]:
        return {
            "tokens_since_fired": self.tokens_since_fired,
            "fire_count": self.fire_count,
            "activation_sum": self.activation_sum,
            "tokens": torch.tensor(self.tokens, dtype=torch.int64),
        }

    def load_state(self, state: dict[str, Tensor]) -> None:
        device = self.fire_count.device
        self.tokens_since_fired = state["tokens_since_fired"].to(device)
        self.fire_count = state["fire_count"].to(device)
        self.activation_sum = state["activation_sum"].to(device)
        self.tokens = int(state["tokens"])


def firing_histogram(frequency: Tensor, bins: int = 20, low: float = 1e-7) -> tuple[list[float], list[int]]:
    """Histogram of log10 firing frequencies; never-firing latents go in the first bin.

    Returns (bin edges in log10 units, counts) — the standard SAE health plot:
    a healthy dictionary has one hump and few latents at the left edge."""
    logf = torch.log10(frequency.float().clamp_min(low))
    edges = torch.linspace(math.log10(low), 0.0, bins + 1)
    counts = torch.histc(logf, bins=bins, min=edges[0].item(), max=0.0)
    return edges.tolist(), [int(c) for c in counts.tolist()]


@torch.no_grad()
def evaluate(dictionary, x: Tensor, batch_size: int = 4096, dead_window: int | None = None) -> dict[str, float]:
    """FVU, MSE, cosine, L0 and dead fraction of ``dictionary`` on activations ``x: (N, d)``.

    Latents are "dead" here when they never fire on ``x`` (or within
    ``dead_window`` tokens of its end)."""
    x = x.reshape(-1, x.shape[-1])
    device = next(dictionary.buffers()).device
    tracker = FiringTracker(dictionary.n_latents, device)
    sq_err = total = cos = 0.0
    l0 = 0.0
    mean = x.float().mean(0).to(device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device).float()
        codes = dictionary.encode(xb)
        x_hat = dictionary.decode(codes).float()
        tracker.update(codes)
        sq_err += float((xb - x_hat).pow(2).sum())
        total += float((xb - mean).pow(2).sum())
        cos += float(torch.nn.functional.cosine_similarity(xb, x_hat, dim=-1).sum())
        l0 += float((codes.values > 0).sum())
    n = max(x.shape[0], 1)
    return {
        "fvu": sq_err / max(total, 1e-30),
        "mse": sq_err / (n * x.shape[-1]),
        "cosine": cos / n,
        "l0": l0 / n,
        "dead_fraction": tracker.dead_fraction(dead_window or n),
    }
