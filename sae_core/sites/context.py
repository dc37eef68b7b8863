"""The contract between runtime adapters and what runs at a site, and the one per-call context.

An adapter (one per runtime and model family) finds a site's activations during a forward pass,
lays the site's own tokens out as ``(batch, tokens, d)`` (image OR text, never both) and calls a
*site function* ``fn(h, ctx) -> h``. Capture records ``h`` and returns it untouched; steering
returns an edited ``h``. Site functions live in ``sae_core`` and know nothing about ComfyUI or
diffusers: ``ctx`` tells them where and when they are.

Both runtimes build ``ctx`` with :func:`call_context` from what their sampler says, so a site
function sees the same numbers under ComfyUI's KSampler and a diffusers pipeline.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..timesteps import schedule_progress


@dataclass(frozen=True)
class SiteContext:
    """Where and when a site function runs."""

    sigma: Optional[float]
    """Current noise level (ComfyUI's sigma; a flow model's timestep; a DDPM step's sigma); None if unknown."""
    progress: Optional[float]
    """Position in the sampling schedule: 0 at the first step, 1 at the last; None if unknown."""
    cond: Optional[Tensor]
    """(batch,) bool: True for rows computed for the positive prompt (CFG's cond half); None if unknown."""
    grid: Optional[tuple[int, int]]
    """(rows, cols) of one frame's image tokens, so masks and heatmaps lie over the picture; None for text."""
    timestep: Optional[float] = None
    """The model's own timestep input (first row), as the network received it; None if unknown."""
    frames: int = 1
    """Latent frames the image tokens span (video models): tokens = frames x rows x cols, frame-major."""

    def at(self, grid: Optional[tuple[int, int]], frames: int = 1) -> "SiteContext":
        """This call's context for one site's token layout."""
        return dataclasses.replace(self, grid=grid, frames=frames)


SiteFunction = Callable[[Tensor, SiteContext], Tensor]


def cond_from_chunks(chunks: Optional[Sequence[int]], batch: int) -> Optional[Tensor]:
    """``(batch,)`` bool, True for the rows of cond chunks (0 = cond, 1 = uncond, as ComfyUI's
    ``cond_or_uncond``: the call's rows are the chunks concatenated, equally long); None when the
    chunks do not tile the batch."""
    if not chunks or batch % len(chunks):
        return None
    per_chunk = batch // len(chunks)
    return torch.tensor([int(c) == 0 for c in chunks], dtype=torch.bool).repeat_interleave(per_chunk)


def first_float(value: Union[float, Tensor, Sequence[float], None]) -> Optional[float]:
    """The first element of a scalar, sequence or tensor as a float; None when absent or empty."""
    if value is None:
        return None
    try:
        flat = torch.as_tensor(value).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        return None
    return float(flat[0]) if flat.numel() else None


def call_context(
    batch: int,
    *,
    sigma: Union[float, Tensor, None] = None,
    schedule: Union[Sequence[float], Tensor, None] = None,
    progress: Optional[float] = None,
    cond: Union[Tensor, Sequence[bool], None] = None,
    chunks: Optional[Sequence[int]] = None,
    timestep: Union[float, Tensor, None] = None,
) -> SiteContext:
    """The context of one model call of ``batch`` rows, from whatever the runtime knows.

    ``progress`` is taken as given, else placed from ``sigma`` in ``schedule``
    (:func:`sae_core.timesteps.schedule_progress`). Rows for the prompt come from ``cond`` (one bool
    per row) or ``chunks`` (ComfyUI's ``cond_or_uncond``). What is not known stays None; site
    functions must not guess it (a progress window then raises, see ``in_window``).
    """
    value = first_float(sigma)
    if progress is None and value is not None and schedule is not None:
        progress = schedule_progress(value, schedule)
    rows: Optional[Tensor] = None
    if cond is not None:
        rows = torch.as_tensor(cond).reshape(-1).to(torch.bool).cpu()
        rows = rows if rows.numel() == batch else None
    elif chunks is not None:
        rows = cond_from_chunks(chunks, batch)
    return SiteContext(sigma=value, progress=progress, cond=rows, grid=None, timestep=first_float(timestep))


def prompt_rows(ctx: SiteContext, batch: int) -> Tensor:
    """Indices of the rows computed for the positive prompt: what capture, atlases and steering
    experiments read. Every row when the runtime cannot tell (no CFG, or an unknown layout)."""
    if ctx.cond is None:
        return torch.arange(batch)
    return torch.nonzero(ctx.cond.to(torch.bool).cpu()).reshape(-1)
