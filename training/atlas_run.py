"""Generating the images a feature index is made of, and writing the atlas page from it.

:func:`build_index` generates each prompt's images with an :class:`~sae_core.feature_index.IndexProbe` at the
site: every model call's tokens are encoded by the dictionary and tallied for the timestep and guidance
profiles, and the cond rows of the first call at or after progress ``at`` feed the top images (so heatmaps sit
on what was drawn). It checkpoints every ``checkpoint_every`` images (rounded up to whole batches) and resumes a
killed build from the last checkpoint with the same batches, hence the same images.

:func:`build_atlas` (the ``atlas`` command) builds the index into ``<out>/index/`` and writes the static page
``<out>/index.html`` from it; run again with the same arguments it resumes the build, or reuses a finished one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from torch import Tensor
from tqdm import tqdm

from sae_core import Site
from sae_core.feature_index import DictionaryIdentity, FeatureIndex, FeatureIndexBuilder, IndexProbe, texts_digest

from .atlas import write_atlas
from .runner import Runner


def build_index(runner: Runner, dictionary: Any, site: Site, prompts: Sequence[str], folder: Path, *,
                images_per_prompt: int = 1, seed: int = 0, at: float = 0.5, top_m: int = 8, batch_size: int = 8,
                dictionary_path: Union[str, os.PathLike, None] = None, checkpoint_every: int = 64,
                overwrite: bool = False, profile: bool = True) -> FeatureIndex:
    """The feature index of ``dictionary`` at ``site`` over ``prompts`` (image ``j`` of prompt ``i`` from seed
    ``seed + i * images_per_prompt + j``), built or resumed in ``folder``."""
    jobs = [(p, seed + i * images_per_prompt + j) for i, p in enumerate(prompts) for j in range(images_per_prompt)]
    source = {"model": runner.name, "site": site.name, "prompts": len(prompts), "prompts_sha256": texts_digest(prompts),
              "images_per_prompt": images_per_prompt, "seed": seed, "at": at, "batch_size": batch_size,
              "profile": profile}
    batches = -(-max(checkpoint_every, 1) // batch_size)
    builder = FeatureIndexBuilder(folder, DictionaryIdentity.of(dictionary, dictionary_path), top_m=top_m,
                                  source=source, checkpoint_every=batches * batch_size, overwrite=overwrite)
    probe = IndexProbe(dictionary, at=at, profile=profile)
    if not builder.complete:
        starts = range(builder.n_images, len(jobs), batch_size)
        for start in tqdm(starts, desc="feature index images", unit="batch"):
            chunk = jobs[start:start + batch_size]
            probe.begin(len(chunk))
            images = runner.generate([p for p, _ in chunk], [s for _, s in chunk], site_functions={site: probe})
            probe.feed(builder, images_to_uint8(images), [p for p, _ in chunk], [s for _, s in chunk])
            builder.maybe_checkpoint()
    return builder.finish()


def build_atlas(runner: Runner, dictionary: Any, site: Site, prompts: Sequence[str], out: Path, *,
                images_per_prompt: int = 1, seed: int = 0, at: float = 0.5, top_m: int = 8,
                n_features: Optional[int] = None, batch_size: int = 8,
                dictionary_path: Union[str, os.PathLike, None] = None, checkpoint_every: int = 64,
                overwrite: bool = False, index_folder: Union[str, os.PathLike, None] = None) -> Path:
    """Build (or resume, or reuse) the index in ``index_folder`` (default ``<out>/index/``) and write
    ``<out>/index.html``; returns its path."""
    folder = Path(out) / "index" if index_folder is None else Path(index_folder)
    index = build_index(runner, dictionary, site, prompts, folder, images_per_prompt=images_per_prompt,
                        seed=seed, at=at, top_m=top_m, batch_size=batch_size, dictionary_path=dictionary_path,
                        checkpoint_every=checkpoint_every, overwrite=overwrite)
    title = f"Feature atlas: {dictionary.n_latents} features at {site.name} of {runner.name}"
    return write_atlas(index, Path(out), title=title, site_name=site.name, n_features=n_features)


def images_to_uint8(images: Tensor) -> list[np.ndarray]:
    """A runner's images (B, C, H, W) in [0, 1] as uint8 arrays: (H, W) for one channel, else (H, W, 3)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
