"""What every diffusers adapter shares: the interface, the per-call context, and hooks that cannot leak.

An adapter knows one group of model classes and says only three things: the model's
:class:`~sae_core.sites.Catalogue` (built in ``sae_core.sites`` from numbers in the diffusers config,
so ComfyUI lists the very same sites), where a site's tensor is (:meth:`Adapter.tap`: which module,
which item of its output, how the tokens are laid out) and what a model call says by itself
(:meth:`Adapter.model_call`: timestep, token grid, frames, where text and image lie in a joint
sequence). Everything else is here: names resolve through the catalogue (either runtime's naming),
:meth:`Adapter.attach` registers one named forward hook per site function plus two on the model
itself (they build the call's context once with :func:`sae_core.sites.call_context`, the function
ComfyUI's adapters use too, then clear it), and removes every one of them when the ``with`` block
ends, however it ends. A site function sees the site's own tokens as ``(batch, tokens, d)`` and
whatever it returns replaces them (the contract of :mod:`sae_core.sites.context`). The conditioning
site ``context:text`` is no module's output but the model's own ``encoder_hidden_states`` argument
(:func:`context_tap`): a forward pre-hook on the model edits it before any block reads it.

Timestep windows in a :class:`Site` are not applied here: gating is the site function's job
(``sae_core.timesteps.in_window``), which raises :class:`~sae_core.errors.ScheduleError` for a
progress window when the context source gives no schedule; nothing here catches it.
"""
from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sae_core import call_context, Catalogue, ScheduleError, Site, SiteContext, SiteError, SiteFunction

HOOK_PREFIX = "diffusion_sae"
CONTEXT_KEYS = ("sigma", "schedule", "progress", "cond")
"""What a context source may say about a call (keywords of :func:`sae_core.sites.call_context`)."""


@dataclass(frozen=True)
class Span:
    """Where one part (text or image) of a token sequence lies: row ``b``'s tokens start at ``start[b]``
    and count ``length[b]`` (an int: the same for every row).

    A site function sees ``(batch, max length, d)``; a row shorter than that is padded with zeros,
    and what a function writes there is dropped (diffusers packs some joint sequences per row, e.g.
    Lumina 2's caption lengths come from each row's attention mask).
    """

    start: Union[int, Tensor]
    length: Union[int, Tensor]

    @property
    def uniform(self) -> bool:
        return isinstance(self.start, int) and isinstance(self.length, int)

    def _index(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        start = torch.as_tensor(self.start, device=x.device).reshape(-1).expand(batch)
        length = torch.as_tensor(self.length, device=x.device).reshape(-1).expand(batch)
        steps = torch.arange(int(length.max()), device=x.device)
        return (start[:, None] + steps).clamp(max=x.shape[1] - 1), steps < length[:, None]

    def take(self, x: Tensor) -> Tensor:
        """This part of ``x`` (batch, sequence, d) as (batch, tokens, d)."""
        if self.uniform:
            return x[:, self.start:self.start + self.length]
        index, valid = self._index(x)
        picked = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        return torch.where(valid[..., None], picked, torch.zeros((), dtype=x.dtype, device=x.device))

    def put(self, x: Tensor, part: Tensor) -> Tensor:
        """``x`` with this part replaced by ``part`` (a new tensor; ``x`` is not modified)."""
        if self.uniform:
            if self.start == 0 and self.start + self.length >= x.shape[1]:
                return part
            return torch.cat([x[:, :self.start], part, x[:, self.start + self.length:]], dim=1)
        index, valid = self._index(x)
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(index)
        out = x.clone()
        out[rows[valid], index[valid]] = part[valid]
        return out


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
    """(rows, cols) of one frame's image tokens when the call lays them out as a full row-major grid."""
    frames: int = 1
    """Latent frames the image tokens span (video models), frame-major."""
    spans: Mapping[str, Span] = field(default_factory=dict)
    """"text" / "image" -> where that part lies in the sequences of taps with ``part`` set."""


@runtime_checkable
class ContextSource(Protocol):
    """Says where sampling stands for each model call (see :class:`training.adapters.SamplingState`)."""

    def context_values(self, call: ModelCall) -> Mapping[str, Any]:
        """Any of ``sigma``, ``schedule``, ``progress``, ``cond`` (see :func:`sae_core.sites.call_context`)."""


ContextLike = Union[ContextSource, Callable[[], Mapping[str, Any]], None]
"""A :class:`ContextSource`, a plain callable returning some of ``{"sigma", "schedule", "progress", "cond"}``,
or None: then only what the model call itself says (``ModelCall.sigma``, the timestep) is known, and a
progress window raises :class:`~sae_core.errors.ScheduleError`."""


def context_of(source: ContextLike, call: ModelCall) -> SiteContext:
    """The call's context (grid still None) from the source's values and the call's own."""
    if isinstance(source, ContextSource):
        values = dict(source.context_values(call))
    else:
        values = dict(source()) if source is not None else {}
    unknown = set(values) - set(CONTEXT_KEYS)
    if unknown:
        raise ScheduleError(f"a context source returned unknown keys {sorted(unknown)}; use "
                              + ", ".join(CONTEXT_KEYS))
    sigma = values.pop("sigma", None)
    return call_context(call.batch, sigma=call.sigma if sigma is None else sigma, timestep=call.timestep, **values)


@dataclass(frozen=True)
class Tap:
    """Where a site's tensor lies in one module's call.

    The module's first argument (by keyword or position 0) is its input; the "update" stream is the
    output minus the input of ``input_module`` (default: the module itself), noted by a forward
    pre-hook before the block runs.
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
    part: Optional[str] = None
    """"text" / "image": the tensor is a sequence holding more than the site's tokens (a joint
    text+image sequence, padding); the site's tokens are ``ModelCall.spans[part]`` of it."""
    input_module: Optional[nn.Module] = None
    """The module whose input is the block's input for "update", when not ``module`` (a U-Net block
    that is two diffusers modules)."""
    argument: Optional[str] = None
    """The site's tensor is this forward argument of ``module`` (the model's own ``encoder_hidden_states``
    for the conditioning site), edited before the module runs rather than read from its output."""

    def output_tensor(self, output: Any) -> Tensor:
        return output if self.index is None else output[self.index]

    def replace(self, output: Any, new: Tensor) -> Any:
        if self.index is None:
            return new
        old = output[self.index]
        items = list(output)
        items[self.index] = new
        if self.skips is not None:
            items[self.skips] = tuple(new if t is old else t for t in output[self.skips])
        return tuple(items)


def context_tap(model: nn.Module) -> Tap:
    """The conditioning site ``context:text``: the text tokens the model is called with (every diffusers
    denoiser here takes them as ``encoder_hidden_states``), edited before the model runs."""
    return Tap(model, None, "text", argument="encoder_hidden_states")


def first_argument(module: nn.Module) -> str:
    """Name of the first parameter of ``module``'s forward (its input, "hidden_states" or "x")."""
    parameters = list(inspect.signature(type(module).forward).parameters)
    return parameters[1] if len(parameters) > 1 else ""


def to_tokens(x: Tensor, layout: str) -> Tensor:
    """The site tensor as (batch, tokens, d): spatial maps (B, C, H, W) -> (B, H*W, C), a view."""
    return x.flatten(2).transpose(1, 2) if layout == "spatial" else x


def from_tokens(h: Tensor, like: Tensor, layout: str) -> Tensor:
    """Inverse of :func:`to_tokens`, shaped like ``like``."""
    return h.transpose(1, 2).reshape(like.shape) if layout == "spatial" else h


class _Attachment:
    """The hooks of one ``attach`` block, the call under way and the block inputs noted for "update"."""

    def __init__(self, adapter: "Adapter", model: nn.Module, source: ContextLike):
        self.adapter, self.source = adapter, source
        self.signature = inspect.signature(type(model).forward)  # the class's: offloading wrappers hide model.forward's
        self.call: Optional[ModelCall] = None
        self.context: Optional[SiteContext] = None
        self.inputs: dict[int, Tensor] = {}
        self.handles: dict[str, RemovableHandle] = {}

    def add(self, name: str, handle: RemovableHandle) -> None:
        self.handles[name] = handle

    def remove_all(self) -> None:
        while self.handles:
            _, handle = self.handles.popitem()
            handle.remove()

    def site_context(self, h: Tensor, x: Tensor, layout: str) -> SiteContext:
        context = self.context if self.context is not None else call_context(h.shape[0])
        if layout == "spatial":
            return context.at((int(x.shape[-2]), int(x.shape[-1])))
        call = self.call
        if layout == "image" and call is not None and call.grid is not None:
            rows, cols = call.grid
            if rows * cols * call.frames == h.shape[1]:
                return context.at((rows, cols), call.frames)
        return context.at(None)


class _CallStart:
    """Model forward pre-hook: reads the call's arguments once and builds its context."""

    def __init__(self, attachment: _Attachment):
        self.attachment = attachment

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        a = self.attachment
        arguments = a.signature.bind_partial(module, *args, **kwargs).arguments
        a.call = a.adapter.model_call(module, arguments)
        a.context = context_of(a.source, a.call)


class _CallEnd:
    """Model forward hook (always called, also on errors): a finished call's context must not linger."""

    def __init__(self, attachment: _Attachment):
        self.attachment = attachment

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.attachment.call = self.attachment.context = None
        self.attachment.inputs.clear()


class _NoteInput:
    """Forward pre-hook keeping a copy of a block's input for the "update" stream (a block may write
    over its input tensor, so the copy is taken before it runs)."""

    def __init__(self, attachment: _Attachment, module: nn.Module):
        self.attachment, self.name = attachment, first_argument(module)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs[self.name] if self.name in kwargs else args[0]
        self.attachment.inputs[id(module)] = x.detach().clone()


def _check_returned(site: Site, new: Any, given: Tensor) -> None:
    """A site function must return tokens of the shape it was given."""
    if not isinstance(new, Tensor) or new.shape != given.shape:
        shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise SiteError(f"the site function at {site} returned {shape}, expected {tuple(given.shape)}")


class _SiteHook:
    """Forward hook that runs one site function on one site's tokens and writes the result back.

    When the function returns its input tensor itself the module's output is left untouched, so a
    capture (or an idle steer) is bit-identical to no hook. An "update" edit is added to the output
    as the change it makes to the update.
    """

    def __init__(self, site: Site, tap: Tap, fn: SiteFunction, attachment: _Attachment):
        self.site, self.tap, self.fn, self.attachment = site, tap, fn, attachment

    def _span(self) -> Optional[Span]:
        if self.tap.part is None:
            return None
        call = self.attachment.call
        span = call.spans.get(self.tap.part) if call is not None else None
        if span is None:
            raise SiteError(f"the site {self.site.name} needs to know where the {self.tap.part} tokens lie in its "
                            "block's sequence, and this model call does not say (call the model itself, not the block)")
        return span

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        tap, span = self.tap, self._span()
        out = tap.output_tensor(output)
        part = span.take(out) if span is not None else out
        x = part
        if tap.update:
            before = self.attachment.inputs[id(tap.input_module or tap.module)]
            x = part - (span.take(before) if span is not None else before)
        h = to_tokens(x, tap.layout)
        new = self.fn(h, self.attachment.site_context(h, x, tap.layout))
        if new is h:
            return None
        _check_returned(self.site, new, h)
        new_x = from_tokens(new.to(device=x.device, dtype=x.dtype), x, tap.layout)
        edited = part + (new_x - x) if tap.update else new_x
        return tap.replace(output, span.put(out, edited) if span is not None else edited)


class _ArgumentHook:
    """Forward pre-hook that runs one site function on an argument of the module (the conditioning site:
    the text tokens a model is called with) and calls the module with the result. Registered after
    :class:`_CallStart`, so the call's context is known. An unchanged result leaves the call untouched."""

    def __init__(self, site: Site, tap: Tap, fn: SiteFunction, attachment: _Attachment):
        self.site, self.tap, self.fn, self.attachment = site, tap, fn, attachment
        parameters = list(inspect.signature(type(tap.module).forward).parameters)
        self.position = parameters.index(tap.argument) - 1 if tap.argument in parameters else -1
        """Where the argument is among the positional ones (``self`` aside); -1: keyword only."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        name, position = self.tap.argument, self.position
        x = kwargs.get(name) if name in kwargs else (args[position] if 0 <= position < len(args) else None)
        if not isinstance(x, Tensor):
            raise SiteError(f"the site {self.site.name} is the model's {name} argument, and this call gave "
                            f"{type(x).__name__} for it")
        new = self.fn(x, self.attachment.site_context(x, x, "text"))
        if new is x:
            return None
        _check_returned(self.site, new, x)
        new = new.to(device=x.device, dtype=x.dtype)
        if name in kwargs:
            return args, {**kwargs, name: new}
        return args[:position] + (new,) + args[position + 1:], kwargs


class Adapter(ABC):
    """One group of diffusers model classes behind one interface: catalogue, taps, what a call says."""

    model_classes: tuple[str, ...]
    """diffusers class names this adapter reads (matched along the model's MRO)."""

    def handles(self, model: Any) -> bool:
        """Matched by class name along the MRO: no diffusers import is needed to inspect a model."""
        return any(cls.__name__ in self.model_classes for cls in type(model).__mro__)

    @abstractmethod
    def catalogue(self, model: nn.Module) -> Catalogue:
        """Every site of this model, from the numbers in its diffusers config."""

    @abstractmethod
    def tap(self, model: nn.Module, site: Site) -> Tap:
        """Where ``site`` (resolved by this model's catalogue) lies in the model."""

    @abstractmethod
    def model_call(self, model: nn.Module, arguments: Mapping[str, Any]) -> ModelCall:
        """What a model call with these (bound) arguments says by itself."""

    def family(self, model: nn.Module) -> str:
        return self.catalogue(model).family

    def available_sites(self, model: nn.Module) -> list[Site]:
        """Every site of this model; ``extra["d"]`` is the width of its tokens."""
        return self.catalogue(model).sites

    def resolve(self, model: nn.Module, site: Union[Site, str]) -> Site:
        """The model's own site for ``site``: a Site (a dictionary's header) or a name in either runtime's
        naming ("double_blocks.1:image", "transformer_blocks.1:image"); SiteError listing the sites otherwise.
        A Site's timestep window is kept."""
        return self.catalogue(model).resolve(site)

    def module(self, model: nn.Module, site: Site) -> nn.Module:
        """The diffusers module of ``site``'s block."""
        return model.get_submodule(self.catalogue(model).module(site, "diffusers"))

    @contextlib.contextmanager
    def attach(self, model: nn.Module, site_functions: Mapping[Union[Site, str], SiteFunction], *,
               context: ContextLike = None) -> Iterator[None]:
        """Run ``site_functions`` at their sites for every model call inside the ``with`` block.

        Several functions at one site run in the mapping's order, each on the previous one's result.
        Every site is checked before any hook is added; every hook is removed on exit, also when
        the block (or a hook) raises.
        """
        catalogue = self.catalogue(model)
        plan = []
        for site, fn in site_functions.items():
            if not callable(fn):
                raise SiteError(f"the function for site {site} is not callable ({type(fn).__name__})")
            plan.append((catalogue.resolve(site), fn))
        attachment = _Attachment(self, model, context)
        try:
            attachment.add(f"{HOOK_PREFIX}:call_start",
                           model.register_forward_pre_hook(_CallStart(attachment), with_kwargs=True))
            attachment.add(f"{HOOK_PREFIX}:call_end",
                           model.register_forward_hook(_CallEnd(attachment), with_kwargs=True, always_call=True))
            for n, (site, fn) in enumerate(plan):
                tap = self.tap(model, site)
                if tap.update:
                    noted = tap.input_module or tap.module
                    name = f"{HOOK_PREFIX}:input:{id(noted)}"
                    if name not in attachment.handles:
                        attachment.add(name, noted.register_forward_pre_hook(_NoteInput(attachment, noted),
                                                                             with_kwargs=True))
                if tap.argument is not None:
                    hook = tap.module.register_forward_pre_hook(_ArgumentHook(site, tap, fn, attachment),
                                                                with_kwargs=True)
                else:
                    hook = tap.module.register_forward_hook(_SiteHook(site, tap, fn, attachment), with_kwargs=True)
                attachment.add(f"{HOOK_PREFIX}:{n}:{site.name}", hook)
            yield
        finally:
            attachment.remove_all()
