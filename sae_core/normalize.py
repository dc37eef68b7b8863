"""Input normalisation that travels with a dictionary.

Diffusion residual streams have a few tokens with norms hundreds of times the
median, and their overall scale differs by orders of magnitude between blocks.
A dictionary therefore works on ``(x - mean) / std`` and keeps ``mean`` and
``std`` as buffers, so that encode takes and decode returns activations in the
model's own space, and feature directions are reported there too.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import DictionaryError

MODES = ("none", "scale", "standardize")


class Standardizer(nn.Module):
    """``normalize(x) = (x - mean) / std`` with per-dimension ``mean`` and ``std``."""

    mean: Tensor
    std: Tensor

    def __init__(self, d_in: int, mean: Tensor | None = None, std: Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in) if mean is None else mean.detach().float().clone())
        self.register_buffer("std", torch.ones(d_in) if std is None else std.detach().float().clone())

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def denormalize(self, y: Tensor) -> Tensor:
        return y * self.std.to(y.dtype) + self.mean.to(y.dtype)

    def direction_to_model_space(self, v: Tensor) -> Tensor:
        """A change of ``v`` in normalised space is a change of ``v * std`` in the model."""
        return v * self.std.to(v.dtype)

    @property
    def is_identity(self) -> bool:
        return bool((self.mean == 0).all() and (self.std == 1).all())


def check_statistics(standardizer: Standardizer, d_in: int, where: str) -> None:
    """Refuse statistics read from a file that do not fit the dictionary or that would turn every
    input into inf or NaN: ``mean`` and ``std`` of shape ``(d_in,)``, finite, ``std > 0``."""
    mean, std = standardizer.mean, standardizer.std
    if mean.shape != (d_in,) or std.shape != (d_in,):
        raise DictionaryError(
            f"{where}: the input statistics have shapes {tuple(mean.shape)} (mean) and {tuple(std.shape)} (std) "
            f"but the dictionary has width {d_in}; the file is damaged, re-download or re-save it"
        )
    bad_std = int((~(torch.isfinite(std) & (std > 0))).sum())
    bad_mean = int((~torch.isfinite(mean)).sum())
    if bad_std or bad_mean:
        raise DictionaryError(
            f"{where}: the input statistics have {bad_std} zero, negative or non-finite std entries and {bad_mean} "
            "non-finite mean entries; they would turn activations into inf or NaN, re-export or re-save the dictionary"
        )


def fit_standardizer(x: Tensor, mode: str = "scale", eps: float = 1e-6) -> Standardizer:
    """Estimate normalisation statistics from a sample of activations ``x: (N, d)``.

    ``scale``: one scalar so that the mean squared norm becomes ``d`` (as in
    sparsify/SAELens "expected average norm"); keeps the geometry, tames scale.
    ``standardize``: per-dimension mean and std (seed A's preprocessing).
    ``none``: identity.
    """
    if mode not in MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; use one of {', '.join(MODES)}")
    x = x.detach().float()
    d = x.shape[-1]
    if mode == "none":
        return Standardizer(d)
    if mode == "scale":
        rms = x.pow(2).sum(-1).mean().div(d).sqrt().clamp_min(eps)
        return Standardizer(d, std=rms.expand(d).cpu())
    mean = x.mean(0)
    std = x.std(0).clamp_min(eps)
    return Standardizer(d, mean=mean.cpu(), std=std.cpu())
