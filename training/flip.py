"""Does steering work? Class flip rates on the model organism, against controls of the same size.

For a target class: generate images of the other classes' prompts, add a direction to the site's
tokens (cond rows, every step in the window) at several strengths, and count how many samples the
classifier now calls the target. Three directions, added the same way (``strength`` x the row's mean
token norm along the unit direction, :func:`sae_core.steering.add_direction`), so only the direction
differs:

* the dictionary feature most specific to the target (highest mean activation on target-prompt
  images minus the mean over the other classes);
* a random unit direction (the control: what any push of that size does);
* the difference of means of the site's activations, target minus others (the supervised baseline
  that anchors.md reports flipping colour 75% of the time in Flux).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from sae_core import in_window, prompt_rows, Record, Recorder, Site, SiteContext, SiteFunction
from sae_core.steering import add_direction

from .runner import Runner


def direction_function(direction: Tensor, strength: float, window: Optional[tuple[float, float]] = None) -> SiteFunction:
    """Add ``strength`` x mean token norm along ``direction`` to the cond rows, inside ``window``."""

    def add(h: Tensor, ctx: SiteContext) -> Tensor:
        if strength == 0 or not in_window(ctx, window):
            return h
        weights = torch.zeros(h.shape[0], h.shape[1])
        weights[prompt_rows(ctx, h.shape[0])] = 1.0
        return add_direction(h, direction, strength, "token_norm", token_weights=weights)

    return add


@dataclass
class ClassProfile:
    """Per class: mean dictionary activation of every feature, and mean site activation."""

    feature_means: Tensor
    """(classes, n_latents)"""
    activation_means: Tensor
    """(classes, d)"""


def profile_classes(runner: Runner, dictionaries: dict[str, Any], site: Site, prompts: Sequence[str], seeds: Sequence[int],
                    window: Optional[tuple[float, float]] = None, batch_size: int = 16) -> dict[str, ClassProfile]:
    """Mean feature activations per class prompt (over tokens, steps in ``window`` and seeds), per dictionary."""
    sums = {name: torch.zeros(len(prompts), d.n_latents) for name, d in dictionaries.items()}
    act_sums = torch.zeros(len(prompts), int(site.extra["d"]))
    counts = torch.zeros(len(prompts))
    jobs = [(c, s) for c in range(len(prompts)) for s in seeds]
    for start in tqdm(range(0, len(jobs), batch_size), desc="profile classes", unit="batch", leave=False):
        chunk = jobs[start:start + batch_size]
        classes = torch.tensor([c for c, _ in chunk])

        def accumulate(record: Record) -> None:
            x = record.acts
            owner = classes[record.rows]
            act_sums.index_add_(0, owner, x.mean(1))
            counts.index_add_(0, owner, torch.ones(len(owner)))
            per_token_owner = owner.repeat_interleave(x.shape[1])
            for name, dictionary in dictionaries.items():
                with torch.no_grad():
                    codes = dictionary.encode(x.reshape(-1, x.shape[-1]))  # sparse: no tokens x latents matrix
                where = (per_token_owner[:, None].expand_as(codes.indices), codes.indices.cpu())
                sums[name].index_put_(where, codes.values.float().cpu() / x.shape[1], accumulate=True)

        recorder = Recorder(window=window, stream=accumulate)
        recorder.begin(range(len(chunk)))
        runner.generate([prompts[c] for c, _ in chunk], [s for _, s in chunk], site_functions={site: recorder})
    denom = counts.clamp_min(1)[:, None]
    return {name: ClassProfile(total / denom, act_sums / denom) for name, total in sums.items()}


def specific_feature(feature_means: Tensor, target: int, among: Sequence[int]) -> int:
    """The feature whose mean activation on the target exceeds its mean over the other classes most."""
    others = [c for c in among if c != target]
    score = feature_means[target] - feature_means[others].mean(0)
    return int(score.argmax())


def flip_rates(runner: Runner, classify: Callable[[Tensor], Tensor], site: Site, directions: dict[str, Tensor],
               prompts: Sequence[str], source_classes: Sequence[int], target: int, strengths: Sequence[float],
               seeds: Sequence[int], window: Optional[tuple[float, float]] = None,
               batch_size: int = 32) -> list[dict[str, Any]]:
    """One row per (direction, strength): the fraction of source-class samples classified as ``target``."""
    jobs = [(c, s) for c in source_classes for s in seeds]
    rows = []
    total = len(directions) * len(strengths)
    with tqdm(total=total, desc=f"flip to class {target}", unit="setting", leave=False) as bar:
        for name, direction in directions.items():
            for strength in strengths:
                predicted, prompted = [], []
                for start in range(0, len(jobs), batch_size):
                    chunk = jobs[start:start + batch_size]
                    fn = direction_function(direction, strength, window)
                    images = runner.generate([prompts[c] for c, _ in chunk], [s for _, s in chunk], site_functions={site: fn})
                    predicted.append(classify(images))
                    prompted.append(torch.tensor([c for c, _ in chunk]))
                pred, asked = torch.cat(predicted), torch.cat(prompted)
                rows.append({"direction": name, "strength": strength, "samples": len(pred),
                             "flip_rate": round(float((pred == target).float().mean()), 4),
                             "kept_prompt_class": round(float((pred == asked).float().mean()), 4)})
                bar.update(1)
    return rows


def random_direction(d: int, seed: int) -> Tensor:
    return torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(seed)), dim=0)
