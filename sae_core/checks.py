"""The checks every dictionary makes, worded the same way for all kinds: the inputs of ``encode`` and
``decode``, and the fields of a file header or a foreign config.

Field checks raise a :class:`DictionaryError` that names the field and its value but not the file: the
caller that knows the file adds it (see :mod:`sae_core.fileformat` and :mod:`sae_core.foreign`).
"""
from __future__ import annotations

import math
import reprlib
from typing import Any, Iterable

import torch
from torch import Tensor

from .errors import DictionaryError
from .normalize import Standardizer
from .sites.site import Site

MAX_SIZE = 2**31 - 1
"""Largest width, latent count or L0 a header may give: beyond it no dictionary fits in memory, and
the products of sizes stay within int64."""


# --- messages --------------------------------------------------------------------------------


def printable(value: Any, limit: int = 60) -> str:
    """``value`` as one short line for a message: control characters escaped, long text cut."""
    try:
        text = repr(value) if isinstance(value, str) else reprlib.repr(value)  # reprlib cuts strings at 30
    except ValueError:  # an int with more digits than Python prints
        text = f"a {type(value).__name__} too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def listed(names: Iterable[Any], limit: int = 8) -> str:
    """Names (of tensors, settings) as one line: escaped, cut, at most ``limit`` of them."""
    shown = [repr(str(name))[1:-1][:60] for name in sorted(names, key=str)]
    more = f" and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more if shown else "none"


def short_reason(err: BaseException) -> str:
    """The first sentence of an exception's message, for one-line DictionaryErrors."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0].split(". ")[0][:200]


# --- encode / decode inputs ------------------------------------------------------------------


def check_width(x: Tensor, d_in: int, site: Site) -> None:
    """Activations must have the width the dictionary was trained on."""
    if x.shape[-1] != d_in:
        raise DictionaryError(
            f"activations have width {x.shape[-1]} but this dictionary (site {site}) expects "
            f"d_in={d_in}; use a dictionary trained on this site or pick the matching site"
        )


def check_activations(x: Any, d_in: int, site: Site) -> None:
    """What ``encode`` accepts: a floating-point torch tensor ``(..., d_in)``."""
    if not isinstance(x, Tensor):
        raise DictionaryError(
            f"activations must be a torch tensor of shape (..., {d_in}), got {type(x).__name__}; convert it with torch.as_tensor"
        )
    if x.ndim == 0:
        raise DictionaryError(f"activations must have shape (..., {d_in}), got a single number (a 0-d tensor); add the feature dimension")
    if not x.is_floating_point():
        raise DictionaryError(f"activations must be floating point, got {x.dtype}; convert them with x.float()")
    check_width(x, d_in, site)


def check_codes(codes: Any, n_latents: int) -> None:
    """What ``decode`` accepts: codes as ``encode`` returns them, pointing at latents that exist."""
    if not (isinstance(codes, tuple) and len(codes) == 2 and all(isinstance(t, Tensor) for t in codes)):
        raise DictionaryError(f"codes must be SparseCodes(values, indices) as encode returns them, got {type(codes).__name__}")
    values, indices = codes
    if values.ndim == 0 or values.shape != indices.shape:
        raise DictionaryError(
            f"code values {tuple(values.shape)} and indices {tuple(indices.shape)} must have one shape (..., width); "
            "pass the codes encode returned"
        )
    if not values.is_floating_point() or indices.dtype not in (torch.int32, torch.int64):
        raise DictionaryError(f"code values must be floating point and indices integers, got {values.dtype} and {indices.dtype}")
    if n_latents and indices.numel() and bool(((indices < 0) | (indices >= n_latents)).any()):
        raise DictionaryError(f"code indices must lie in 0..{n_latents - 1}: this dictionary has {n_latents} latents")


def model_space_direction(rows: Tensor, feature: int, standardizer: Standardizer, unit: bool) -> Tensor:
    """Row ``feature`` of a dictionary's decoder, mapped back to the model's activation space."""
    if not 0 <= feature < rows.shape[0]:
        raise DictionaryError(f"feature {feature} is out of range: this dictionary has {rows.shape[0]} latents (0..{rows.shape[0] - 1})")
    v = standardizer.direction_to_model_space(rows[feature].detach())
    return v / v.norm().clamp_min(1e-12) if unit else v


# --- header and config fields ----------------------------------------------------------------


def required(config: dict[str, Any], name: str) -> Any:
    if name not in config:
        raise DictionaryError(f"'{name}' is missing")
    return config[name]


def whole_number(value: Any, name: str, low: int, high: int = MAX_SIZE, high_name: str | None = None) -> int:
    """An integer in ``[low, high]``; true/false and 3.0 are not integers here (JSON keeps them apart)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DictionaryError(f"{name}={printable(value)} is not a whole number")
    if not low <= value <= high:
        raise DictionaryError(f"{name}={printable(value)} must be between {low} and {high_name or high}")
    return value


def real_number(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DictionaryError(f"{name}={printable(value)} is not a finite number")
    if not (low < value if low_open else low <= value) or value > high:
        raise DictionaryError(f"{name}={printable(value)} must be in {'(' if low_open else '['}{low:g}, {high:g}]")
    return float(value)


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise DictionaryError(f"{name}={printable(value)} is not true or false")
    return value


def text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise DictionaryError(f"{name}={printable(value)} is not a string")
    return value


def mapping(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DictionaryError(f"{name}={printable(value)} is not a JSON object")
    return value
