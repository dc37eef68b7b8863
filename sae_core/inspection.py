"""What one image's feature activations look like: a feature's map over the image, that map laid over a
picture, and the features that fire most (drawn by :func:`sae_core.plots.bar_chart`).

Input is dense activations ``(tokens, n_latents)`` of one image's tokens at a site
(``dictionary.dense_codes(tokens)``), tokens in row-major order over the site's token grid. ComfyUI's
Feature Heatmap and Top Features nodes show these; they need nothing but torch and Pillow.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, DictionaryError, SiteError

HEAT_COLOUR = (1.0, 0.0, 0.0)
"""The colour a feature's heat is painted in (red)."""


class FeatureSummary(NamedTuple):
    """How one feature fired over an image's tokens."""

    feature: int
    mean: float
    """Mean activation over all tokens (0 where the dictionary did not select it)."""
    share: float
    """Fraction of tokens on which it fired."""


def feature_map(activations: Tensor, feature: int, grid: Optional[tuple[int, int]]) -> Tensor:
    """``(rows, cols)`` map of ``feature``'s activation over the token grid, scaled so that its peak is 1
    (all zeros where it never fired)."""
    if not 0 <= feature < activations.shape[1]:
        raise DictionaryError(f"feature {feature} is out of range: this dictionary has {activations.shape[1]} "
                              f"latents (0..{activations.shape[1] - 1})")
    if grid is None:
        raise SiteError("this site has no image grid (text tokens): a heatmap needs an image stream")
    rows, cols = grid
    if rows * cols != activations.shape[0]:
        raise SiteError(f"the recording's {activations.shape[0]} tokens are not one {rows}x{cols} image (a video's "
                        "frames?): a heatmap shows one picture")
    values = activations[:, feature].float().reshape(rows, cols)
    peak = values.max()
    return values / peak if peak > 0 else values


def overlay_heatmap(images: Tensor, heat: Tensor, opacity: float) -> Tensor:
    """``images`` ``(batch, H, W, 3)`` in [0, 1] with ``heat`` ``(rows, cols)`` in [0, 1] resized bilinearly to
    ``(H, W)`` and painted in :data:`HEAT_COLOUR` with alpha ``opacity x heat``: silent tokens leave the picture
    as it was."""
    if not 0.0 <= opacity <= 1.0:  # NaN too
        raise ConfigError(f"opacity {opacity}: use a number from 0 (heat not shown) to 1 (opaque where it peaks)")
    resized = F.interpolate(heat.float()[None, None], size=tuple(images.shape[1:3]), mode="bilinear",
                            align_corners=False)[0, 0]
    alpha = (opacity * resized.clamp(0, 1)).to(images)[None, :, :, None]
    return images * (1 - alpha) + torch.tensor(HEAT_COLOUR).to(images) * alpha


def top_features(activations: Tensor, n: int) -> list[FeatureSummary]:
    """The ``n`` features of highest mean activation over the tokens, highest first."""
    mean = activations.float().mean(0)
    values, ids = mean.topk(min(n, activations.shape[1]))
    share = (activations[:, ids] > 0).float().mean(0)
    return [FeatureSummary(int(i), float(v), float(s)) for i, v, s in zip(ids, values, share)]
