"""Generating the images an atlas is made of, and reading the dictionary's codes on them.

Each image's site tokens are read at one point of sampling (``at``: the first model call at or after
that progress), cond rows only, encoded by the dictionary and handed to
:class:`training.atlas.AtlasAccumulator` with the finished image, so heatmaps sit on what was drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from sae_core.intervention import SiteContext, cond_rows
from sae_core.site import Site

from .atlas import AtlasAccumulator
from .runner import Runner


class _ReadAt:
    """Site function keeping the cond rows' tokens and grid of the first call at or after progress ``at``."""

    def __init__(self, at: float):
        self.at = at
        self.tokens: Optional[Tensor] = None
        self.grid: Optional[tuple[int, int]] = None

    def __call__(self, h: Tensor, ctx: SiteContext) -> Tensor:
        if self.tokens is None and (ctx.progress is None or ctx.progress >= self.at - 1e-6):
            rows = cond_rows(ctx, h.shape[0])
            self.tokens, self.grid = h[rows].detach().float().cpu(), ctx.grid
        return h


def build_atlas(runner: Runner, dictionary: Any, site: Site, prompts: Sequence[str], out: Path, *,
                images_per_prompt: int = 1, seed: int = 0, at: float = 0.5, top_m: int = 8,
                n_features: Optional[int] = None, batch_size: int = 8) -> Path:
    accumulator = AtlasAccumulator(dictionary.n_latents, top_m=top_m)
    jobs = [(p, seed + i * images_per_prompt + j) for i, p in enumerate(prompts) for j in range(images_per_prompt)]
    for start in tqdm(range(0, len(jobs), batch_size), desc="atlas images", unit="batch"):
        chunk = jobs[start:start + batch_size]
        reader = _ReadAt(at)
        images = runner.generate([p for p, _ in chunk], [s for _, s in chunk], site_functions={site: reader})
        if reader.tokens is None:
            raise RuntimeError(f"the site {site.name} was never called at progress >= {at}")
        with torch.no_grad():
            codes = dictionary.encode(reader.tokens.reshape(-1, reader.tokens.shape[-1]))
        per_image = reader.tokens.shape[1]
        pixels = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for i, (prompt, _) in enumerate(chunk):
            rows = slice(i * per_image, (i + 1) * per_image)
            image = pixels[i, :, :, 0] if pixels.shape[-1] == 1 else pixels[i]
            accumulator.add(np.ascontiguousarray(image), prompt, type(codes)(codes.values[rows], codes.indices[rows]), reader.grid)
    title = f"Feature atlas: {dictionary.n_latents} features at {site.name} of {runner.name}"
    return accumulator.write(out, title=title, site_name=site.name, n_features=n_features)
