"""The two checks every dictionary makes, worded the same way for all kinds."""
from __future__ import annotations

from torch import Tensor

from .errors import DictionaryError
from .normalize import Standardizer
from .sites.site import Site


def check_width(x: Tensor, d_in: int, site: Site) -> None:
    """Activations must have the width the dictionary was trained on."""
    if x.shape[-1] != d_in:
        raise DictionaryError(
            f"activations have width {x.shape[-1]} but this dictionary (site {site}) expects "
            f"d_in={d_in}; use a dictionary trained on this site or pick the matching site"
        )


def model_space_direction(rows: Tensor, feature: int, standardizer: Standardizer, unit: bool) -> Tensor:
    """Row ``feature`` of a dictionary's decoder, mapped back to the model's activation space."""
    if not 0 <= feature < rows.shape[0]:
        raise DictionaryError(f"feature {feature} is out of range: this dictionary has {rows.shape[0]} latents (0..{rows.shape[0] - 1})")
    v = standardizer.direction_to_model_space(rows[feature].detach())
    return v / v.norm().clamp_min(1e-12) if unit else v
