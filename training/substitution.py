"""Reconstruction-substituted generation: does the model still draw the same image from the dictionary's
reconstruction of a site?

Each prompt and seed is generated three times: as is, with the site's tokens replaced at every step by
the dictionary's reconstruction ``decode(encode(h))``, and with them replaced by their mean token
(mean-ablation, the floor any dictionary must beat). The scores compare each to the original: pixel
MSE and PSNR, and, given a classifier, how often the class is unchanged. The site's FVU during the
substituted run is reported as well, since it is measured on the activations the model actually
produced along that trajectory.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from sae_core import Site, SiteContext, SiteFunction

from .runner import Runner


def reconstruction_function(dictionary: Any, errors: list[tuple[float, float]]) -> SiteFunction:
    def substitute(h: Tensor, ctx: SiteContext) -> Tensor:
        x = h.reshape(-1, h.shape[-1]).float()
        with torch.no_grad():
            x_hat = dictionary.decode(dictionary.encode(x)).float()
        errors.append((float((x - x_hat).pow(2).sum()), float((x - x.mean(0)).pow(2).sum())))
        return x_hat.reshape(h.shape).to(h.dtype)

    return substitute


def mean_ablation(h: Tensor, ctx: SiteContext) -> Tensor:
    return h.mean(dim=1, keepdim=True).expand_as(h).clone()


def _psnr(mse: float) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def substitution_scores(runner: Runner, dictionary: Any, site: Site, prompts: Sequence[str], seeds: Sequence[int],
                        classify: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[dict[str, Any], Tensor]:
    """Scores and the images (3, B, C, H, W): originals, substituted, mean-ablated."""
    errors: list[tuple[float, float]] = []
    original = runner.generate(prompts, seeds)
    substituted = runner.generate(prompts, seeds, site_functions={site: reconstruction_function(dictionary, errors)})
    ablated = runner.generate(prompts, seeds, site_functions={site: mean_ablation})
    scores: dict[str, Any] = {"samples": len(prompts),
                              "site_fvu_along_trajectory": round(sum(e for e, _ in errors) / max(sum(t for _, t in errors), 1e-30), 4)}
    for name, images in (("substituted", substituted), ("mean_ablated", ablated)):
        mse = float((images - original).pow(2).mean())
        scores[name] = {"pixel_mse": round(mse, 5), "psnr_db": round(_psnr(mse), 2)}
        if classify is not None:
            scores[name]["same_class"] = round(float((classify(images) == classify(original)).float().mean()), 4)
    return scores, torch.stack([original, substituted, ablated])
