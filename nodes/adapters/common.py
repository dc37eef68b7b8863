"""What the ComfyUI adapters share: the interface, the per-call context, running a site function, and
the note of what the diffusion model was called with.

ComfyUI gives every diffusion-model call a fresh ``transformer_options`` dict (``samplers.py``
``_calc_cond_batch``) holding, in 0.3.75 and later:

* ``"sigmas"``: the current noise level, a tensor with one entry per row of the original batch;
* ``"sample_sigmas"``: the sampler's whole schedule, ending in 0 (set in ``samplers.sample``);
* ``"cond_or_uncond"``: one entry per batch chunk, 0 = cond (positive prompt), 1 = uncond; the call's
  rows are these chunks concatenated, each ``rows // len(cond_or_uncond)`` long.

All three are read with ``.get``: a caller outside a sampler (or an older ComfyUI) may lack them, and
then the context says None rather than guess. Timestep windows in a :class:`Site` are not applied
here: gating is the site function's job (``sae_core.timesteps.in_window``), as in the diffusers
adapters.

Transformer blocks never see the latent, so the token grid is not theirs to know. The transformer
adapters register :func:`note_model_call` as a ``WrappersMP.APPLY_MODEL`` wrapper on their clones:
``BaseModel.apply_model`` runs those for every family (SD3's MMDiT runs no ``DIFFUSION_MODEL``
wrappers), and it passes its own ``transformer_options`` dict, the one every block of the call gets,
on to the network. The wrapper puts a :class:`ModelCall` (latent shape, prompt length, timestep) in
that dict under :data:`CALL_KEY`; blocks read it from their ``args["transformer_options"]``.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ...sae_core.errors import DictionaryError, SiteError
from ...sae_core.sites import (CONTEXT, FAMILIES, Catalogue, Site, SiteContext, SiteFunction, call_context, family,
                               first_float, transformer_catalogue)
from ...sae_core.sites.unet import SHAPES

PATCH_KEY = "diffusion_sae"
"""Key of the wrappers this plugin registers on a ModelPatcher."""

CALL_KEY = "diffusion_sae_call"
"""``transformer_options`` key of this model call's :class:`ModelCall`."""

SUPPORTED = ("transformers: " + ", ".join(spec.title for spec in FAMILIES.values())
             + "; U-Nets: " + ", ".join(SHAPES))
"""The families some adapter handles, for error messages."""


def unsupported(model: Any, detail: str = "") -> SiteError:
    name = type(model).__name__
    return SiteError(f"site not supported for this model ({name}{detail}); supported: {SUPPORTED}")


def diffusion_model(model_patcher: Any) -> torch.nn.Module:
    """The ``diffusion_model`` of a ComfyUI MODEL (a ModelPatcher); SiteError for anything else."""
    base = getattr(model_patcher, "model", None)
    net = getattr(base, "diffusion_model", None)
    if net is None or not callable(getattr(model_patcher, "clone", None)):
        raise SiteError(f"expected a ComfyUI MODEL (a ModelPatcher), got {type(model_patcher).__name__}; "
                        f"supported: {SUPPORTED}")
    return net


def patch_size(size: Any) -> tuple[int, int, int]:
    """A network's patch size (an int, or per axis) as ``(frames, rows, cols)``."""
    size = tuple(int(p) for p in size) if isinstance(size, (tuple, list)) else (int(size),) * 2
    return (1, *size) if len(size) == 2 else size


def number(attribute: str) -> Callable[[torch.nn.Module], int]:
    """Reads an int attribute of a network (its width)."""
    return lambda net: int(getattr(net, attribute))


def _own_patch(net: torch.nn.Module) -> tuple[int, int, int]:
    return patch_size(net.patch_size)


def first_linear_input(net: torch.nn.Module, path: str) -> Optional[int]:
    """``in_features`` of the first linear layer in ``net``'s module ``path`` (None if it has none: SD3 without
    a text embedder has an ``nn.Identity`` there)."""
    try:
        module = net.get_submodule(path)
    except AttributeError:
        return None
    return next((int(m.in_features) for m in module.modules() if isinstance(m, torch.nn.Linear)), None)


@dataclass(frozen=True)
class Network:
    """How one family's ComfyUI network is recognised and measured."""

    family: str
    module: str
    cls: str
    """The network class (``module.cls``); subclasses are other models and do not match."""
    width: Callable[[torch.nn.Module], int]
    patch: Callable[[torch.nn.Module], tuple[int, int, int]] = _own_patch
    base: Optional[str] = None
    """The MODEL must be an instance of this ``comfy.model_base`` class (families sharing a network)."""
    not_base: tuple[str, ...] = ()
    context: Optional[str] = None
    """The network's module that first reads the prompt's tokens (``c_crossattn``, the network's ``context``);
    its first linear layer's input width is the conditioning site's width. None: no conditioning site."""

    def context_width(self, net: torch.nn.Module) -> Optional[int]:
        return first_linear_input(net, self.context) if self.context else None

    def matches(self, model_patcher: Any) -> bool:
        try:
            network = getattr(importlib.import_module(self.module), self.cls)
            import comfy.model_base as bases
        except (ImportError, AttributeError):  # an older ComfyUI without this family
            return False
        model = getattr(model_patcher, "model", None)
        if type(getattr(model, "diffusion_model", None)) is not network:
            return False
        if self.base is not None and not isinstance(model, getattr(bases, self.base, ())):
            return False
        return not any(isinstance(model, getattr(bases, name, ())) for name in self.not_base)


@dataclass(frozen=True)
class ModelCall:
    """What one call of the diffusion model was given (``BaseModel.apply_model``'s arguments)."""

    shape: tuple[int, ...]
    """The latent: (batch, channels, rows, cols) or (batch, channels, frames, rows, cols)."""
    context_tokens: Optional[int]
    """Tokens of the prompt's conditioning (``c_crossattn``), before the network adds any of its own."""
    timestep: Optional[float]
    """The network's timestep input (``model_sampling.timestep(sigma)``), first row."""
    inputs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Shapes of the other tensor inputs by name (ComfyUI's extra conds, e.g. HiDream-E1's ``image_cond``)."""

    def grid(self, patch: Sequence[int]) -> Optional[tuple[int, int, int]]:
        """``(frames, rows, cols)`` of the latent's tokens for a ``(frames, rows, cols)`` patch size: every
        network here pads each axis up to a multiple of its patch (``pad_to_patch_size``) and cuts it
        into patches; None for a latent that is neither an image nor a video."""
        if len(self.shape) not in (4, 5):
            return None
        sizes = self.shape[2:] if len(self.shape) == 5 else (1, *self.shape[2:])
        frames, rows, cols = (math.ceil(int(size) / int(p)) for size, p in zip(sizes, patch))
        return frames, rows, cols


def model_call(args: Sequence[Any], kwargs: Mapping[str, Any], model: Any) -> ModelCall:
    """The :class:`ModelCall` of ``BaseModel.apply_model(x, t, c_concat, c_crossattn, control,
    transformer_options, **extra_conds)`` (``model``: the BaseModel, for its timestep scale)."""
    x = args[0] if args else kwargs.get("x")
    sigma = args[1] if len(args) > 1 else kwargs.get("t")
    context = args[3] if len(args) > 3 else kwargs.get("c_crossattn")
    sampling = getattr(model, "model_sampling", None)
    timestep = None
    if isinstance(sigma, Tensor) and sampling is not None:
        timestep = first_float(sampling.timestep(sigma))
    inputs = {name: tuple(value.shape) for name, value in kwargs.items() if isinstance(value, Tensor)}
    prompt = int(context.shape[1]) if isinstance(context, Tensor) and context.ndim == 3 else None
    return ModelCall(shape=tuple(x.shape) if isinstance(x, Tensor) else (), context_tokens=prompt, timestep=timestep,
                     inputs=inputs)


def call_options(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[dict]:
    """The ``transformer_options`` dict of an ``apply_model`` call (None when absent)."""
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    return options if isinstance(options, dict) else None


def note_model_call(executor, *args, **kwargs):
    """``WrappersMP.APPLY_MODEL`` wrapper: put this call's :class:`ModelCall` where its blocks find it."""
    options = call_options(args, kwargs)
    if options is not None:
        options[CALL_KEY] = model_call(args, kwargs, executor.class_obj)
    return executor(*args, **kwargs)


def add_wrapper(clone: Any, wrapper) -> bool:
    """Register ``wrapper`` as an APPLY_MODEL wrapper of ``clone`` once; False where ComfyUI has no wrappers."""
    try:
        from comfy.patcher_extension import WrappersMP
    except ImportError:
        return False
    if not hasattr(clone, "add_wrapper_with_key"):
        return False
    if wrapper not in clone.get_wrappers(WrappersMP.APPLY_MODEL, PATCH_KEY):
        clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, PATCH_KEY, wrapper)
    return True


def noted_call(transformer_options: Optional[Mapping[str, Any]]) -> Optional[ModelCall]:
    call = (transformer_options or {}).get(CALL_KEY)
    return call if isinstance(call, ModelCall) else None


def comfy_context(transformer_options: Optional[Mapping[str, Any]], batch: int) -> SiteContext:
    """The context of one model call from its ``transformer_options`` (grid still None: see ``SiteContext.at``)."""
    options = transformer_options or {}
    call = noted_call(options)
    return call_context(batch, sigma=options.get("sigmas"), schedule=options.get("sample_sigmas"),
                        chunks=options.get("cond_or_uncond"), timestep=call.timestep if call else None)


def _context_wrapper(entries: list) -> Callable:
    """The APPLY_MODEL wrapper running the conditioning site's functions on ``c_crossattn`` (the prompt's tokens
    as ``BaseModel.apply_model`` hands them to the network) for one model call, before the network runs.
    ComfyUI calls it with ``(x, t, c_concat, c_crossattn, control, transformer_options, **extra_conds)``."""

    def edit_context(executor, *args, **kwargs):
        at = 3 if len(args) > 3 else None
        context = args[at] if at is not None else kwargs.get("c_crossattn")
        if not isinstance(context, Tensor) or context.ndim != 3:
            site = entries[0][0]
            raise SiteError(f"the site {site.name} edits the prompt's tokens, and this model call has none "
                            f"(c_crossattn is {type(context).__name__}): is the model given a text conditioning?")
        ctx = comfy_context(call_options(args, kwargs), context.shape[0])
        edited = context
        for site, fn in entries:
            edited = edit_tokens(site, fn, edited, 0, edited.shape[1], ctx)
        if edited is not context:
            if at is not None:
                args = args[:at] + (edited,) + args[at + 1:]
            else:
                kwargs = {**kwargs, "c_crossattn": edited}
        return executor(*args, **kwargs)

    return edit_context


def run_site(site: Site, fn: SiteFunction, h: Tensor, ctx: SiteContext) -> Tensor:
    """``fn(h, ctx)``, checked: same shape back, cast to ``h``'s dtype and device."""
    new = fn(h, ctx)
    if not isinstance(new, Tensor) or tuple(new.shape) != tuple(h.shape):
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise SiteError(f"the site function at {site} returned {got}, expected {tuple(h.shape)} "
                        "(a site function must return tokens of the shape it was given)")
    if new.dtype != h.dtype or new.device != h.device:
        new = new.to(device=h.device, dtype=h.dtype)
    return new


def edit_tokens(site: Site, fn: SiteFunction, x: Tensor, start: int, stop: int, ctx: SiteContext,
                before: Optional[Tensor] = None) -> Tensor:
    """Run ``fn`` on tokens ``x[:, start:stop]`` of ``(batch, tokens, d)`` and put the result back.

    With ``before`` (the block's input, same layout) the function sees the update ``x - before`` on
    those tokens, and what it adds to the update is added to ``x``. An unchanged result leaves the
    values bit-identical (and returns ``x`` itself).
    """
    part = x[:, start:stop]
    if before is not None:
        update = part - before[:, start:stop]
        new = run_site(site, fn, update, ctx)
        if new is update:
            return x
        edited = part + (new - update)
    else:
        view = part if part.is_contiguous() else part.contiguous()
        new = run_site(site, fn, view, ctx)
        if new is part:  # returned the very view of x: nothing to put back (in-place edits already are)
            return x
        edited = new
    if start == 0 and stop >= x.shape[1]:
        return edited
    return torch.cat([x[:, :start], edited, x[:, stop:]], dim=1)


class ComfyAdapter:
    """One runtime's view of a group of model families in ComfyUI.

    An adapter says only which MODELs it handles, their :class:`Catalogue` (built in ``sae_core.sites``
    from the model's numbers) and how to install site functions (:meth:`install`). ``patch(model_patcher,
    {site: fn})`` resolves every site once (names in either runtime's naming; widths checked when
    given), then returns a CLONE of the patcher with the functions installed, leaving the given patcher
    untouched. Patching a clone that already carries this plugin's patches (or another node's
    replacement) on the same block wraps them: both run, the earlier one first.
    """

    name = "comfy"

    def handles(self, model_patcher: Any) -> bool:
        raise NotImplementedError

    def catalogue(self, model_patcher: Any) -> Catalogue:
        raise NotImplementedError

    def install(self, model_patcher: Any, plan: Mapping[str, list]) -> Any:
        """A clone of ``model_patcher`` running ``plan`` (``{block: [(site, fn), ...]}``, sites resolved)."""
        raise NotImplementedError

    def patch(self, model_patcher: Any, site_functions: Mapping[Union[Site, str], SiteFunction],
              widths: Optional[Mapping[Union[Site, str], int]] = None) -> Any:
        """A clone of ``model_patcher`` running ``site_functions`` at their sites; ``widths``: the width each
        function needs (a dictionary's ``d_in``), refused before anything is patched if the site differs."""
        return self.apply(model_patcher, self.plan(model_patcher, site_functions, widths))

    def apply(self, model_patcher: Any, plan: Mapping[str, list]) -> Any:
        """A clone of ``model_patcher`` running ``plan``: the blocks by this adapter's :meth:`install`, the
        conditioning site (``context``, the same for every family) by an APPLY_MODEL wrapper."""
        blocks = {block: entries for block, entries in plan.items() if block != CONTEXT}
        clone = self.install(model_patcher, blocks) if blocks else model_patcher.clone()
        if CONTEXT in plan and not add_wrapper(clone, _context_wrapper(plan[CONTEXT])):
            raise SiteError("this ComfyUI has no model wrappers (WrappersMP.APPLY_MODEL), which the conditioning "
                            "site context:text needs: update ComfyUI")
        return clone

    def family(self, model_patcher: Any) -> str:
        return self.catalogue(model_patcher).family

    def available_sites(self, model_patcher: Any) -> list[Site]:
        return self.catalogue(model_patcher).sites

    def resolve(self, model_patcher: Any, site: Site | str) -> Site:
        """The model's own site for ``site`` (a Site or a name in either runtime's naming)."""
        return self.catalogue(model_patcher).resolve(site)

    def site_width(self, model_patcher: Any, site: Site | str) -> int:
        """Width ``d`` of the tokens at ``site``."""
        return int(self.resolve(model_patcher, site).extra["d"])

    def plan(self, model_patcher: Any, site_functions: Mapping[Union[Site, str], SiteFunction],
             widths: Optional[Mapping[Union[Site, str], int]] = None) -> dict[str, list]:
        """``{block: [(site, fn), ...]}`` in the mapping's order; every site resolved and checked before anything
        is patched."""
        if not site_functions:
            raise SiteError("no site functions given: pass {site: fn} for at least one site")
        catalogue = self.catalogue(model_patcher)
        grouped: dict[str, list] = {}
        for site, fn in site_functions.items():
            if not callable(fn):
                raise SiteError(f"the function for site {site} is not callable ({type(fn).__name__})")
            own = catalogue.resolve(site)
            needed = (widths or {}).get(site)
            if needed is not None and int(needed) != own.extra["d"]:
                raise DictionaryError(f"the dictionary has d_in={int(needed)} but site {own.name} has width "
                                      f"{own.extra['d']}; load a dictionary trained on this site, or pick the site "
                                      "it was trained on")
            grouped.setdefault(own.block, []).append((own, fn))
        return grouped


class NetworkAdapter(ComfyAdapter):
    """An adapter for transformer families recognised by their network (:class:`Network`)."""

    networks: tuple[Network, ...] = ()

    def network(self, model_patcher: Any) -> Optional[Network]:
        return next((spec for spec in self.networks if spec.matches(model_patcher)), None)

    def handles(self, model_patcher: Any) -> bool:
        return self.network(model_patcher) is not None

    def spec(self, model_patcher: Any) -> Network:
        spec = self.network(model_patcher)
        if spec is None:
            raise unsupported(diffusion_model(model_patcher), f" is not a network of the {self.name} adapter")
        return spec

    def catalogue(self, model_patcher: Any) -> Catalogue:
        """The family's sites, with the block counts and width read from the network."""
        spec = self.spec(model_patcher)
        net = diffusion_model(model_patcher)
        counts = {kind.prefix: len(getattr(net, kind.prefix)) for kind in family(spec.family).kinds}
        return transformer_catalogue(spec.family, counts, spec.width(net), context_width=spec.context_width(net))
