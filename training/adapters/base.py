"""What every diffusers adapter shares: the interface, the per-call context, and hooks that cannot leak.

An adapter knows one model family: which sites it has (:meth:`Adapter.available_sites`), which
module and which tensor of that module's call each site is (:meth:`Adapter.tap`), and what a
model call says about time and layout (:meth:`Adapter.model_call`). Everything else is here:
:meth:`Adapter.attach` registers one named forward hook per site function plus two on the model
itself (they compute the call's :class:`CallContext` once, then clear it), and removes every one
of them when the ``with`` block ends, however it ends. A site function sees the site's own tokens
as ``(batch, tokens, d)`` and whatever it returns replaces them (sae_core.intervention's contract).

Timestep windows in a :class:`Site` are not applied here: gating is the site function's job
(``sae_core.timesteps.in_window``), as in the ComfyUI nodes.
"""
from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sae_core.errors import DictionaryError
from sae_core.intervention import SiteContext, SiteFunction
from sae_core.site import Site, find_site

HOOK_PREFIX = "diffusion_sae"


@dataclass(frozen=True)
class ModelCall:
    """What one call of the denoiser says by itself about time and layout."""

    batch: int
    """Rows in this call (2x the prompts under batched classifier-free guidance)."""
    timestep: Optional[float]
    """The ``timestep`` argument as the model received it (first row)."""
    sigma: Optional[float]
    """Noise level when the model's input implies it (flow models: the timestep is sigma); else None."""
    grid: Optional[tuple[int, int]]
    """(rows, cols) of the image tokens when the call lays them out as a full row-major grid."""


@dataclass(frozen=True)
class CallContext:
    """Where sampling stands for one model call; the per-site grid completes it into a SiteContext."""

    sigma: Optional[float] = None
    progress: Optional[float] = None
    cond: Optional[Tensor] = None


@runtime_checkable
class ContextSource(Protocol):
    """Says where sampling stands for each model call (see :class:`training.adapters.SamplingState`)."""

    def call_context(self, call: ModelCall) -> CallContext: ...


ContextLike = Union[ContextSource, Callable[[], Mapping[str, Any]], None]
"""A :class:`ContextSource`, a plain callable returning ``{"sigma", "progress", "cond"}`` (keys may be
missing), or None: then only what the model call itself says (``ModelCall.sigma``) is known."""


def _context_for(source: ContextLike, call: ModelCall) -> CallContext:
    if isinstance(source, ContextSource):
        return source.call_context(call)
    values = dict(source()) if source is not None else {}
    unknown = set(values) - {"sigma", "progress", "cond"}
    if unknown:
        raise DictionaryError(f"a context callable returned unknown keys {sorted(unknown)}; use sigma, progress, cond")
    cond = values.get("cond")
    return CallContext(
        sigma=values.get("sigma", call.sigma),
        progress=values.get("progress"),
        cond=torch.as_tensor(cond).reshape(-1).bool() if cond is not None else None,
    )


@dataclass(frozen=True)
class Tap:
    """Where a site's tensor lies in one module's call.

    The module's first argument (``hidden_states``, by keyword or position 0) is its input.
    """

    module: nn.Module
    index: Optional[int]
    """Position of the tensor in the module's output tuple; None when the output is the tensor."""
    layout: str
    """"spatial": (B, C, H, W) maps, one token per position; "image"/"text": (B, tokens, d) already."""
    update: bool = False
    """The site is the module's output minus its input (same shape), not the output itself."""
    skips: Optional[int] = None
    """Position of an output tuple that may hold the same tensor again (a U-Net down block's skip
    connections end with its output): an edit replaces it there too, so the skip sees it."""

    def output_tensor(self, output: Any) -> Tensor:
        return output if self.index is None else output[self.index]

    def input_tensor(self, args: tuple, kwargs: dict) -> Tensor:
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def replace(self, output: Any, new: Tensor) -> Any:
        if self.index is None:
            return new
        old = output[self.index]
        items = list(output)
        items[self.index] = new
        if self.skips is not None:
            items[self.skips] = tuple(new if t is old else t for t in output[self.skips])
        return tuple(items)


def to_tokens(x: Tensor, layout: str) -> Tensor:
    """The site tensor as (batch, tokens, d): spatial maps (B, C, H, W) -> (B, H*W, C), a view."""
    return x.flatten(2).transpose(1, 2) if layout == "spatial" else x


def from_tokens(h: Tensor, like: Tensor, layout: str) -> Tensor:
    """Inverse of :func:`to_tokens`, shaped like ``like``."""
    return h.transpose(1, 2).reshape(like.shape) if layout == "spatial" else h


class _Attachment:
    """The hooks of one ``attach`` block and the context of the model call under way."""

    def __init__(self, adapter: "Adapter", model: nn.Module, source: ContextLike):
        self.adapter, self.source = adapter, source
        self.signature = inspect.signature(type(model).forward)  # the class's: offloading wrappers hide model.forward's
        self.call: Optional[ModelCall] = None
        self.context = CallContext()
        self.handles: dict[str, RemovableHandle] = {}

    def add(self, name: str, handle: RemovableHandle) -> None:
        self.handles[name] = handle

    def remove_all(self) -> None:
        while self.handles:
            _, handle = self.handles.popitem()
            handle.remove()

    def site_context(self, h: Tensor, x: Tensor, layout: str) -> SiteContext:
        grid: Optional[tuple[int, int]] = None
        if layout == "spatial":
            grid = (int(x.shape[-2]), int(x.shape[-1]))
        elif layout == "image" and self.call is not None and self.call.grid is not None:
            rows, cols = self.call.grid
            grid = (rows, cols) if rows * cols == h.shape[1] else None
        ctx = self.context
        return SiteContext(sigma=ctx.sigma, progress=ctx.progress, cond=ctx.cond, grid=grid)


class _CallStart:
    """Model forward pre-hook: reads the call's arguments once, asks the context source."""

    def __init__(self, attachment: _Attachment):
        self.attachment = attachment

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        a = self.attachment
        arguments = a.signature.bind_partial(module, *args, **kwargs).arguments
        a.call = a.adapter.model_call(module, arguments)
        a.context = _context_for(a.source, a.call)


class _CallEnd:
    """Model forward hook (always called, also on errors): a finished call's context must not linger."""

    def __init__(self, attachment: _Attachment):
        self.attachment = attachment

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.attachment.call = None
        self.attachment.context = CallContext()


class _SiteHook:
    """Forward hook that runs one site function on one site's tokens and writes the result back.

    When the function returns its input tensor itself the module's output is left untouched, so a
    capture (or an idle steer) is bit-identical to no hook. An "update" edit is added to the output
    as the change it makes to the update.
    """

    def __init__(self, site: Site, tap: Tap, fn: SiteFunction, attachment: _Attachment):
        self.site, self.tap, self.fn, self.attachment = site, tap, fn, attachment

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        tap = self.tap
        out = tap.output_tensor(output)
        x = out - tap.input_tensor(args, kwargs) if tap.update else out
        h = to_tokens(x, tap.layout)
        new = self.fn(h, self.attachment.site_context(h, x, tap.layout))
        if new is h:
            return None
        if not isinstance(new, Tensor) or new.shape != h.shape:
            shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise DictionaryError(f"the site function at {self.site} returned {shape}, expected {tuple(h.shape)}")
        new_x = from_tokens(new.to(x.dtype), x, tap.layout)
        return tap.replace(output, out + (new_x - x) if tap.update else new_x)


class Adapter(ABC):
    """One model family's sites in diffusers, behind one interface."""

    model_classes: tuple[str, ...]
    """diffusers class names this adapter reads (matched along the model's MRO)."""

    def handles(self, model: Any) -> bool:
        """Matched by class name along the MRO: no diffusers import is needed to inspect a model."""
        return any(cls.__name__ in self.model_classes for cls in type(model).__mro__)

    @abstractmethod
    def family(self, model: nn.Module) -> str:
        """Site family of this model ("flux", "sd15", "sdxl")."""

    @abstractmethod
    def available_sites(self, model: nn.Module) -> list[Site]:
        """Every site of this model; ``extra["d"]`` is the width of its tokens."""

    @abstractmethod
    def tap(self, model: nn.Module, site: Site) -> Tap:
        """Where ``site`` (one of :meth:`available_sites`) lies in the model."""

    @abstractmethod
    def model_call(self, model: nn.Module, arguments: Mapping[str, Any]) -> ModelCall:
        """What a model call with these (bound) arguments says by itself."""

    def resolve(self, model: nn.Module, site: Site) -> Site:
        """The model's own site matching ``site`` by block and stream (family checked, window ignored)."""
        family = self.family(model)
        if site.family not in (family, "unknown"):
            raise DictionaryError(f"site {site} is for a {site.family} model, but this is a {family} model")
        sites = self.available_sites(model)
        own = find_site(sites, site)
        if own is None:
            raise DictionaryError(f"site {site.name} not found in this {family} model; available: "
                                  + ", ".join(s.name for s in sites))
        return own

    @contextlib.contextmanager
    def attach(self, model: nn.Module, site_functions: Mapping[Site, SiteFunction], *,
               context: ContextLike = None) -> Iterator[None]:
        """Run ``site_functions`` at their sites for every model call inside the ``with`` block.

        Several functions at one site run in the mapping's order, each on the previous one's result.
        Every site is checked before any hook is added; every hook is removed on exit, also when
        the block (or a hook) raises.
        """
        plan = [(self.resolve(model, site), fn) for site, fn in site_functions.items()]
        attachment = _Attachment(self, model, context)
        try:
            attachment.add(f"{HOOK_PREFIX}:call_start",
                           model.register_forward_pre_hook(_CallStart(attachment), with_kwargs=True))
            attachment.add(f"{HOOK_PREFIX}:call_end",
                           model.register_forward_hook(_CallEnd(attachment), with_kwargs=True, always_call=True))
            for n, (site, fn) in enumerate(plan):
                tap = self.tap(model, site)
                hook = _SiteHook(site, tap, fn, attachment)
                attachment.add(f"{HOOK_PREFIX}:{n}:{site.name}",
                               tap.module.register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            attachment.remove_all()


def first_value(value: Any) -> Optional[float]:
    """The first element of a scalar or tensor argument as a float; None when absent."""
    if value is None:
        return None
    return float(torch.as_tensor(value).reshape(-1)[0])


def site_list(family: str, names: Sequence[tuple[str, str, int]]) -> list[Site]:
    """Sites from ``(block, stream, d)`` triples."""
    return [Site(family=family, block=block, stream=stream, extra={"d": d}) for block, stream, d in names]
