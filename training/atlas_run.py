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
from tqdm import tqdm

from sae_core import Recorder, ScheduleError, Site

from .atlas import AtlasAccumulator
from .runner import Runner


def build_atlas(runner: Runner, dictionary: Any, site: Site, prompts: Sequence[str], out: Path, *,
                images_per_prompt: int = 1, seed: int = 0, at: float = 0.5, top_m: int = 8,
                n_features: Optional[int] = None, batch_size: int = 8) -> Path:
    accumulator = AtlasAccumulator(dictionary.n_latents, top_m=top_m)
    jobs = [(p, seed + i * images_per_prompt + j) for i, p in enumerate(prompts) for j in range(images_per_prompt)]
    for start in tqdm(range(0, len(jobs), batch_size), desc="atlas images", unit="batch"):
        chunk = jobs[start:start + batch_size]
        reader = Recorder(window=(at, 1.0) if at > 0 else None, keep="first")
        reader.begin(range(len(chunk)))
        images = runner.generate([p for p, _ in chunk], [s for _, s in chunk], site_functions={site: reader})
        records = reader.take()
        if not records:
            raise ScheduleError(f"the site {site.name} was never called at progress >= {at}")
        tokens, grid = records[0].acts, records[0].grid
        with torch.no_grad():
            codes = dictionary.encode(tokens.reshape(-1, tokens.shape[-1]))
        per_image = tokens.shape[1]
        pixels = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for i, (prompt, _) in enumerate(chunk):
            rows = slice(i * per_image, (i + 1) * per_image)
            image = pixels[i, :, :, 0] if pixels.shape[-1] == 1 else pixels[i]
            accumulator.add(np.ascontiguousarray(image), prompt, type(codes)(codes.values[rows], codes.indices[rows]), grid)
    title = f"Feature atlas: {dictionary.n_latents} features at {site.name} of {runner.name}"
    return accumulator.write(out, title=title, site_name=site.name, n_features=n_features)
