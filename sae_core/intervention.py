"""The contract between model adapters and what runs at a site.

An adapter (one per model family and runtime) finds a site's activations during
a forward pass, reshapes the site's own tokens (image or text, never both) to ``(batch, tokens, d)``, and calls a *site
function* ``fn(h, ctx) -> h``. Capture records ``h`` and returns it untouched;
steering returns an edited ``h``. The functions live in ``sae_core`` and know
nothing about ComfyUI or diffusers; ``ctx`` tells them where and when they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class SiteContext:
    """Where and when a site function runs."""

    sigma: Optional[float]
    """Current noise level (ComfyUI sigma, or diffusers' timestep / 1000 for flow models)."""
    progress: Optional[float]
    """Position in the sampling schedule: 0 at the first step, 1 at the last; None if unknown."""
    cond: Optional[Tensor]
    """(batch,) bool: True for rows computed for the positive prompt (CFG's cond half); None if unknown."""
    grid: Optional[tuple[int, int]]
    """(rows, cols) of image tokens, so masks and heatmaps can be laid over the picture; None for text."""


SiteFunction = Callable[[Tensor, SiteContext], Tensor]


def cond_rows(ctx: SiteContext, batch: int) -> Tensor:
    """Indices of the rows computed for the positive prompt: what capture, atlases and steering
    experiments read. Every row when the runtime cannot tell (no CFG, or an unknown layout)."""
    if ctx.cond is None:
        return torch.arange(batch)
    return torch.nonzero(ctx.cond.to(torch.bool).cpu()).reshape(-1)
