"""Where a dictionary lives in a model: family + block + stream + when.

A site is plain data so that it can travel in a file header and be compared
against the site a user wants to patch.
"""
from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import SiteError

STREAMS = ("image", "text", "joint", "residual", "update")
FIELDS = ("family", "block", "stream", "timestep_window", "extra")
"""The keys of :meth:`Site.to_dict`, all of which :meth:`Site.from_dict` requires."""


@dataclass(frozen=True)
class Site:
    """One activation site.

    family: model family ("flux", "sd15", "sdxl", "sd3", "wan", ...: see :mod:`sae_core.sites.families`).
    block: the canonical block name (ComfyUI's module path), e.g. "double_blocks.18", "output_blocks.4";
        other runtimes' names are translated by the family's :class:`~sae_core.sites.Catalogue`. "context"
        is the prompt's tokens as the denoiser receives them (stream "text"), before any block.
    stream: which tokens/tensor: "image", "text", "residual" (U-Net hidden state) or
        "update" (the image tokens' block output minus block input).
    timestep_window: (start, end) in sampling progress 0..1, or None for any time.
    """

    family: str = "unknown"
    block: str = "unknown"
    stream: str = "residual"
    timestep_window: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Site":
        """The inverse of :meth:`to_dict`. Anything else is refused rather than guessed at: a site read
        from a file header or a manifest decides where a dictionary is applied."""
        if not isinstance(data, dict):
            raise SiteError(f"a site record must be a JSON object with {', '.join(FIELDS)}, got {reprlib.repr(data)}")
        missing = [name for name in FIELDS if name not in data]
        if missing:
            raise SiteError(f"the site record has no {', '.join(missing)}")
        for name in ("family", "block", "stream"):
            if not isinstance(data[name], str):
                raise SiteError(f"site {name}={reprlib.repr(data[name])} is not a string")
        if not isinstance(data["extra"], dict):
            raise SiteError(f"site extra={reprlib.repr(data['extra'])} is not a JSON object")
        return cls(family=data["family"], block=data["block"], stream=data["stream"],
                   timestep_window=_window(data["timestep_window"]), extra=dict(data["extra"]))

    @property
    def name(self) -> str:
        """``block:stream``, the form nodes and error messages use."""
        return f"{self.block}:{self.stream}"

    def __str__(self) -> str:
        when = ""
        if self.timestep_window is not None:
            when = f" @ t in [{self.timestep_window[0]:g}, {self.timestep_window[1]:g}]"
        return f"{self.family}:{self.block}:{self.stream}{when}"


def _window(value: Any) -> tuple[float, float] | None:
    """A recorded timestep window: null, or ``[start, end]`` with ``0 <= start <= end <= 1``."""
    if value is None:
        return None
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not numbers or not 0 <= value[0] <= value[1] <= 1:
        raise SiteError(f"site timestep_window={reprlib.repr(value)} is not null or [start, end] with 0 <= start <= end <= 1")
    return float(value[0]), float(value[1])
