"""Where a dictionary lives in a model: family + block + stream + when.

A site is plain data so that it can travel in a file header and be compared
against the site a user wants to patch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STREAMS = ("image", "text", "joint", "residual", "update")


@dataclass(frozen=True)
class Site:
    """One activation site.

    family: model family ("flux", "sd15", "sdxl", "sd3", "wan", ...: see :mod:`sae_core.sites.families`).
    block: the canonical block name (ComfyUI's module path), e.g. "double_blocks.18", "output_blocks.4";
        other runtimes' names are translated by the family's :class:`~sae_core.sites.Catalogue`.
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
    def from_dict(cls, data: dict[str, Any] | None) -> "Site":
        data = dict(data or {})
        window = data.get("timestep_window")
        return cls(
            family=str(data.get("family", "unknown")),
            block=str(data.get("block", "unknown")),
            stream=str(data.get("stream", "residual")),
            timestep_window=tuple(float(v) for v in window) if window else None,
            extra=dict(data.get("extra") or {}),
        )

    @property
    def name(self) -> str:
        """``block:stream``, the form nodes and error messages use."""
        return f"{self.block}:{self.stream}"

    def __str__(self) -> str:
        when = ""
        if self.timestep_window is not None:
            when = f" @ t in [{self.timestep_window[0]:g}, {self.timestep_window[1]:g}]"
        return f"{self.family}:{self.block}:{self.stream}{when}"

