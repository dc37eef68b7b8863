"""The steering grid: one prompt and seed, features x timestep windows down, strengths across."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from PIL import Image

from sae_core import Site, Steer, steer_function

from .grids import image_grid
from .runner import Runner


def steering_grid(runner: Runner, dictionary: Any, site: Site, prompt: str, seed: int, features: Sequence[int],
                  strengths: Sequence[float], windows: Sequence[Optional[tuple[float, float]]], mode: str = "add",
                  units: str = "token_norm") -> Image.Image:
    """Every (feature, window) row steered at every strength; strength 0 is the unsteered image."""
    rows, labels = [], []
    for feature in features:
        for window in windows:
            steers = [Steer(features=(feature,), strengths=(s,), mode=mode, units=units, window=window) for s in strengths]
            functions = [{site: steer_function(dictionary, [steer])} for steer in steers]
            rows.append(torch.cat([runner.generate([prompt], [seed], site_functions=fn) for fn in functions]))
            span = "all steps" if window is None else f"{window[0]:g}-{window[1]:g}"
            labels.append(f"f{feature} {span}")
    title = f"{mode} ({units}) at {site.name}: {prompt!r}, seed {seed}"
    return image_grid(torch.stack(rows), labels, [f"{s:g}" for s in strengths], title)
