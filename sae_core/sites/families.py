"""The diffusion-transformer families: which kinds of block each has, which streams they carry, and
what each runtime calls them. A family's :class:`~sae_core.sites.Catalogue` is built from these facts
plus a model's own numbers (block counts, width), so both runtimes list the same sites.

Streams of a transformer block: "image" (the image tokens of the block's output), "text" (the text
tokens of its output, where the block updates them), "update" (the image tokens' output minus input,
SDLens's target). Canonical block names are ComfyUI's module paths; ``diffusers`` gives diffusers'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import SiteError
from .catalogue import Catalogue, context_block, numbered

IMAGE_STREAMS = ("image", "update")
BOTH_STREAMS = ("image", "text", "update")


@dataclass(frozen=True)
class BlockKind:
    """One kind of block of a family."""

    prefix: str
    """ComfyUI's module list, e.g. "double_blocks" (also the canonical prefix)."""
    role: str
    """"double": separate image and text streams; "single": one joint sequence of text and image
    tokens; "image": image tokens only (text enters by cross-attention); "text": text tokens only."""
    streams: tuple[str, ...]
    diffusers: Optional[str] = None
    """diffusers' module list for the same blocks; None when diffusers has no such model class."""
    last_has_text: bool = True
    """False when the last block of this kind returns no text tokens (SD3's final joint block)."""


@dataclass(frozen=True)
class Family:
    """What is fixed for every model of a family."""

    name: str
    title: str
    kinds: tuple[BlockKind, ...]
    text_first: bool = True
    """Joint ("single") sequences are cat(text, image); False: cat(image, text) (the Hunyuan family)."""
    video: bool = False
    """Image tokens span latent frames (frame-major)."""
    compatible: tuple[str, ...] = ()


def _kinds(*kinds: BlockKind) -> tuple[BlockKind, ...]:
    return kinds


FLUX_KINDS = _kinds(BlockKind("double_blocks", "double", BOTH_STREAMS, "transformer_blocks"),
                    BlockKind("single_blocks", "single", BOTH_STREAMS, "single_transformer_blocks"))

FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("flux", "FLUX.1", FLUX_KINDS),
    Family("flux2", "FLUX.2", FLUX_KINDS),
    Family("chroma", "Chroma", FLUX_KINDS),
    Family("hunyuan_video", "HunyuanVideo", FLUX_KINDS, text_first=False, video=True),
    Family("aura_flow", "AuraFlow", _kinds(
        BlockKind("double_layers", "double", BOTH_STREAMS, "joint_transformer_blocks"),
        BlockKind("single_layers", "single", BOTH_STREAMS, "single_transformer_blocks"))),
    Family("qwen_image", "Qwen-Image", _kinds(
        BlockKind("transformer_blocks", "double", BOTH_STREAMS, "transformer_blocks"))),
    Family("sd3", "SD3 / SD3.5 (MMDiT)", _kinds(
        BlockKind("joint_blocks", "double", BOTH_STREAMS, "transformer_blocks", last_has_text=False))),
    Family("wan", "Wan 2.x", _kinds(BlockKind("blocks", "image", IMAGE_STREAMS, "blocks")), video=True),
    Family("ltxv", "LTX-Video", _kinds(BlockKind("transformer_blocks", "image", IMAGE_STREAMS, "transformer_blocks")),
           video=True),
    Family("lumina2", "Lumina 2 / Z-Image", _kinds(
        BlockKind("noise_refiner", "image", IMAGE_STREAMS, "noise_refiner"),
        BlockKind("context_refiner", "text", ("text",), "context_refiner"),
        BlockKind("layers", "single", BOTH_STREAMS, "layers"))),
    Family("hidream", "HiDream-I1", _kinds(
        BlockKind("double_stream_blocks", "double", BOTH_STREAMS, "double_stream_blocks"),
        BlockKind("single_stream_blocks", "single", BOTH_STREAMS, "single_stream_blocks")), text_first=False),
)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise SiteError(f"unknown model family {name!r}; known transformer families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def transformer_catalogue(name: str, counts: Mapping[str, int], width: int,
                          text_width: Optional[int] = None, context_width: Optional[int] = None) -> Catalogue:
    """The sites of a ``name``-family model with ``counts[prefix]`` blocks of each kind, all ``width`` wide
    (text tokens ``text_width`` wide where that differs); with ``context_width`` (the text encoder's width,
    where the runtime can hand that tensor over) the conditioning site ``context:text`` comes first."""
    spec = family(name)
    unknown = set(counts) - {kind.prefix for kind in spec.kinds}
    if unknown:
        raise SiteError(f"{spec.title} has no blocks {sorted(unknown)}; its kinds: "
                        + ", ".join(kind.prefix for kind in spec.kinds))
    blocks = [context_block(context_width)] if context_width else []
    for kind in spec.kinds:
        count = int(counts.get(kind.prefix, 0))
        widths = {s: int(text_width or width) if s == "text" else int(width) for s in kind.streams}
        skip = [] if kind.last_has_text or count == 0 else [(count - 1, "text")]
        runtimes = {"diffusers": kind.diffusers} if kind.diffusers else None
        blocks += numbered(kind.prefix, count, widths, role=kind.role, runtimes=runtimes, skip=skip)
    return Catalogue(spec.name, tuple(blocks), compatible=spec.compatible)
