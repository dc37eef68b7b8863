"""Diff-C on the model organism: where in the denoiser, and when in the sampling, the class can be read.

Revelio's measurement (Kim, Thomas, Ghadiyaram, ICCV 2025): the organism's held-out real images (never
seen by the denoiser in training) are noised to each level, passed once through the denoiser with the
empty prompt (so the class can only come from the picture), every site's tokens are mean-pooled per image
in that same pass, and :func:`sae_core.probe.probe_accuracy` fits a linear probe on half the images and
scores it on the rest. Given a dictionary, its codes at its site are pooled and probed too, one more row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from sae_core import Site, SiteContext, SiteFunction
from sae_core.probe import ProbeTable, pooled, probe_accuracy, stratified_split

from .runner import Runner

LEVEL_NAME = "sampling progress (0 = pure noise, 1 = last step)"
NULL_PROMPT = ""


@dataclass(frozen=True)
class Row:
    """One row of the table: what is pooled (``features``: the site's tokens -> per-image vectors) at a site."""

    label: str
    site: Site
    features: Callable[[Tensor], Tensor]


def site_rows(sites: Sequence[Site], dictionary: Optional[Any] = None, dictionary_site: Optional[Site] = None) -> list[Row]:
    """The raw pooled activations of each site, then (given a dictionary) its pooled dense codes at its site."""
    rows = [Row(site.name, site, pooled) for site in sites]
    if dictionary is not None and dictionary_site is not None:
        def codes(h: Tensor) -> Tensor:
            batch, tokens, width = h.shape
            with torch.no_grad():
                dense = dictionary.dense_codes(h.reshape(-1, width).float())
            return dense.reshape(batch, tokens, -1).mean(1).float()

        rows.append(Row(f"{dictionary_site.name} codes", dictionary_site, codes))
    return rows


def probe_images(per_class: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``per_class`` held-out images of each class, drawn seeded: (images, labels, index in the held-out
    split, which seeds each image's noise)."""
    from organism.data import organism_data

    _, held_out = organism_data()
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for value in held_out.labels.unique().tolist():
        members = (held_out.labels == value).nonzero().reshape(-1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    index = torch.cat(chosen).sort().values
    return held_out.images[index], held_out.labels[index], index


def pooled_features(runner: Runner, images: Tensor, noise_ids: Tensor, rows: Sequence[Row], levels: Sequence[float],
                    seed: int = 0, batch_size: int = 64, progress: bool = True) -> dict[tuple[str, float], Tensor]:
    """Per (row label, level): (images, width) features, every site read in the same denoiser pass per batch and
    level; image ``i`` is noised from seed ``seed + noise_ids[i]`` at every level."""
    found: dict[tuple[str, float], list[Tensor]] = {(row.label, level): [] for row in rows for level in levels}
    by_site: dict[Site, list[Row]] = {}
    for row in rows:
        by_site.setdefault(row.site, []).append(row)
    batches = range(0, len(images), batch_size)
    with tqdm(total=len(batches) * len(levels), desc="Diff-C denoiser passes", unit="batch", disable=not progress,
              leave=False) as bar:
        for level in levels:
            for start in batches:
                chunk = images[start:start + batch_size]
                seeds = [seed + int(i) for i in noise_ids[start:start + batch_size]]
                functions = {site: _keeper(site_rows_here, level, found) for site, site_rows_here in by_site.items()}
                runner.denoise_batch(chunk, NULL_PROMPT, level, seeds, functions)
                bar.update(1)
    return {key: torch.cat(parts) for key, parts in found.items()}


def _keeper(rows: Sequence[Row], level: float, found: dict[tuple[str, float], list[Tensor]]) -> SiteFunction:
    def keep(h: Tensor, ctx: SiteContext) -> Tensor:
        for row in rows:
            found[(row.label, level)].append(row.features(h.detach()).float().cpu())
        return h

    return keep


def diffc_table(runner: Runner, rows: Sequence[Row], levels: Sequence[float], per_class: int,
                test_fraction: float = 0.5, seed: int = 0, batch_size: int = 64, progress: bool = True) -> ProbeTable:
    """The Diff-C accuracy of every row at every level on the organism's held-out images (see module docstring)."""
    from organism.data import CLASSES

    images, labels, noise_ids = probe_images(per_class, seed)
    train, test = stratified_split(labels, test_fraction, seed)
    features = pooled_features(runner, images, noise_ids, rows, levels, seed, batch_size, progress)
    accuracy = torch.zeros(len(rows), len(levels))
    fits = [(r, c) for r in range(len(rows)) for c in range(len(levels))]
    for r, c in tqdm(fits, desc="Diff-C probes", unit="probe", disable=not progress, leave=False):
        x = features[(rows[r].label, levels[c])]
        accuracy[r, c] = probe_accuracy(x[train], labels[train], x[test], labels[test], len(CLASSES), seed)
    chance = float(labels[test].bincount().max()) / len(test)
    return ProbeTable([row.label for row in rows], [float(v) for v in levels], accuracy, chance, len(train), len(test),
                      LEVEL_NAME)
