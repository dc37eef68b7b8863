"""A model's sites, and the one ``resolve`` that turns a name (any runtime's) into one of them.

A :class:`Catalogue` is built from a few structural numbers of the model (how many blocks of each
kind, their widths, which streams they carry; see :mod:`sae_core.sites.families` and
:mod:`sae_core.sites.unet`), so ComfyUI's and diffusers' adapters list the very same sites for the
same architecture. Site names are canonical (ComfyUI's module paths, the names dictionaries have
always been saved under); each block also knows its module path in every runtime, so a name is
translated both ways and a dictionary trained in one runtime loads by its own site in the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

from ..errors import SiteError
from .site import Site

RUNTIMES = ("comfy", "diffusers")
CONTEXT = "context"
"""The block name of the conditioning site: the prompt's text tokens as the denoiser receives them."""


@dataclass(frozen=True)
class Block:
    """One block of a model: its canonical name, its streams and widths, its module path per runtime."""

    name: str
    """Canonical name, e.g. "double_blocks.3" (ComfyUI's module path)."""
    streams: Mapping[str, int]
    """Stream -> token width ``d``, in the order sites are listed."""
    modules: Mapping[str, str] = field(default_factory=dict)
    """Runtime -> module path when it differs from ``name`` (e.g. {"diffusers": "transformer_blocks.3"})."""
    aliases: tuple[str, ...] = ()
    """Further names that mean this block (e.g. diffusers' "up_blocks.1" for the block ending that level)."""
    role: str = ""
    """What kind of block it is within its family ("double", "single", "input", ...), for the runtimes."""
    inputs: Mapping[str, str] = field(default_factory=dict)
    """Runtime -> the module whose INPUT is this block's input, when that is not the output module
    (a diffusers resnet + attention pair standing for one ComfyUI block): for the "update" stream."""

    def module(self, runtime: str) -> str:
        return self.modules.get(runtime, self.name)

    def input_module(self, runtime: str) -> str:
        return self.inputs.get(runtime, self.module(runtime))


@dataclass(frozen=True)
class Catalogue:
    """Every site of one model, and the translation of its block names between runtimes."""

    family: str
    blocks: tuple[Block, ...]
    compatible: tuple[str, ...] = ()
    """Other family names whose dictionaries fit this model's sites (e.g. "flux" for a Flux fine-tune family)."""

    def __post_init__(self) -> None:
        index: dict[str, Block] = {}
        for block in self.blocks:  # names and aliases first: a module path shared by two blocks loses to them
            for name in (block.name, *block.aliases):
                index.setdefault(name, block)
        for block in self.blocks:
            for name in block.modules.values():
                index.setdefault(name, block)
        object.__setattr__(self, "_index", index)

    @property
    def sites(self) -> list[Site]:
        """Every site, ``extra["d"]`` its width and ``extra["role"]`` its block's role."""
        return [Site(family=self.family, block=b.name, stream=s, extra={"d": int(d), "role": b.role})
                for b in self.blocks for s, d in b.streams.items()]

    @property
    def names(self) -> list[str]:
        return [site.name for site in self.sites]

    def block(self, name: str) -> Optional[Block]:
        """The block called ``name`` in any runtime; None if there is none."""
        return self._index.get(name)  # type: ignore[attr-defined]

    def resolve(self, wanted: Union[Site, str]) -> Site:
        """This model's own site for ``wanted``: a :class:`Site` (from a dictionary's header) or a name
        ``"block:stream"`` / ``"family:block:stream"`` in any runtime's naming. The window of a
        ``Site`` is kept. A site of another family or an unknown name is a :class:`SiteError` that
        lists the sites this model has."""
        site = parse_site(wanted) if isinstance(wanted, str) else wanted
        if site.family not in ("unknown", self.family, *self.compatible):
            raise SiteError(f"site {site} is for a {site.family} model, but this model is {self.family}; "
                            "use a dictionary trained on this model family")
        block = self.block(site.block)
        if block is None or site.stream not in block.streams:
            raise SiteError(f"unknown site {site.name} for this {self.family} model; available sites: "
                            + _listing(self.names))
        return Site(family=self.family, block=block.name, stream=site.stream, timestep_window=site.timestep_window,
                    extra={**site.extra, "d": int(block.streams[site.stream]), "role": block.role})

    def module(self, site: Union[Site, str], runtime: str) -> str:
        """The module path of ``site``'s block in ``runtime`` ("comfy" or "diffusers")."""
        if runtime not in RUNTIMES:
            raise SiteError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
        return self.block(self.resolve(site).block).module(runtime)


def parse_site(name: str) -> Site:
    """``"block:stream"`` or ``"family:block:stream"`` -> Site (family "unknown" when not given)."""
    parts = [p.strip() for p in str(name).strip().split(":")]
    if len(parts) == 2 and all(parts):
        return Site(family="unknown", block=parts[0], stream=parts[1])
    if len(parts) == 3 and all(parts):
        return Site(family=parts[0], block=parts[1], stream=parts[2])
    raise SiteError(f"site {name!r} is not 'block:stream' (e.g. double_blocks.1:image, output_blocks.5:residual)")


def context_block(width: int) -> Block:
    """The conditioning site ``context:text``: the text encoder's tokens as they enter the denoiser (ComfyUI's
    ``c_crossattn``, diffusers' ``encoder_hidden_states``), before any block or projection of the network
    reads them. It is the one site every family has in the same place, and the one where a steer reaches
    every block (each cross-attention of a U-Net, a transformer's text embedder and so its whole text stream).
    It holds no image tokens and is the same at every step unless a steer schedules it."""
    return Block(CONTEXT, {"text": int(width)}, aliases=("encoder_hidden_states", "c_crossattn"), role="context")


def block_sites(sites: Iterable[Site]) -> list[Site]:
    """``sites`` without the conditioning site: the ones the denoiser computes. What reads the picture (Diff-C
    over "all" sites, with an empty prompt that holds ``context:text`` constant) wants only these."""
    return [site for site in sites if site.block != CONTEXT]


def numbered(prefix: str, count: int, streams: Mapping[str, int], *, role: str,
             runtimes: Optional[Mapping[str, str]] = None, skip: Iterable[tuple[int, str]] = ()) -> list[Block]:
    """``count`` blocks ``prefix.0 .. prefix.{count-1}`` with ``streams``; ``runtimes`` maps a runtime to its
    own prefix for the same list of modules; ``skip`` removes ``(index, stream)`` pairs a block lacks."""
    missing = set(skip)
    blocks = []
    for i in range(count):
        own = {s: d for s, d in streams.items() if (i, s) not in missing}
        modules = {runtime: f"{other}.{i}" for runtime, other in (runtimes or {}).items() if other != prefix}
        blocks.append(Block(f"{prefix}.{i}", own, modules, role=role))
    return blocks


def _listing(names: Sequence[str], limit: int = 60) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
