"""What both ComfyUI adapters share: the interface, the per-call context, and running a site function.

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
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ...sae_core.errors import DictionaryError
from ...sae_core.intervention import SiteContext, SiteFunction
from ...sae_core.site import Site, find_site
from ...sae_core.timesteps import schedule_progress

PATCH_KEY = "diffusion_sae"
"""Key of the wrappers this plugin registers on a ModelPatcher."""

SUPPORTED = "Flux double/single blocks, SD1.5/SDXL U-Net input/middle/output blocks"


def unsupported(model: Any, detail: str = "") -> DictionaryError:
    name = type(model).__name__
    return DictionaryError(f"site not supported for this model ({name}{detail}); supported: {SUPPORTED}")


def diffusion_model(model_patcher: Any) -> torch.nn.Module:
    """The ``diffusion_model`` of a ComfyUI MODEL (a ModelPatcher); DictionaryError for anything else."""
    base = getattr(model_patcher, "model", None)
    net = getattr(base, "diffusion_model", None)
    if net is None or not callable(getattr(model_patcher, "clone", None)):
        raise DictionaryError(f"expected a ComfyUI MODEL (a ModelPatcher), got {type(model_patcher).__name__}; "
                              f"supported: {SUPPORTED}")
    return net


def first_float(value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        flat = torch.as_tensor(value).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        return None
    return float(flat[0]) if flat.numel() else None


def cond_rows(cond_or_uncond: Optional[Sequence[int]], batch: int) -> Optional[Tensor]:
    """``(batch,)`` bool on the CPU, True for rows of cond chunks; None when the chunks do not tile the batch."""
    if not cond_or_uncond or batch % len(cond_or_uncond):
        return None
    per_chunk = batch // len(cond_or_uncond)
    chunks = torch.tensor([int(c) == 0 for c in cond_or_uncond], dtype=torch.bool)
    return chunks.repeat_interleave(per_chunk)


class CallInfo:
    """Sigma, progress and cond rows of one model call, read once from its ``transformer_options``."""

    __slots__ = ("sigma", "progress", "cond")

    def __init__(self, transformer_options: Optional[Mapping[str, Any]], batch: int):
        options = transformer_options or {}
        self.sigma = first_float(options.get("sigmas"))
        self.progress = schedule_progress(self.sigma, options.get("sample_sigmas"))
        self.cond = cond_rows(options.get("cond_or_uncond"), batch)

    def context(self, grid: Optional[tuple[int, int]]) -> SiteContext:
        return SiteContext(sigma=self.sigma, progress=self.progress, cond=self.cond, grid=grid)


def run_site(site: Site, fn: SiteFunction, h: Tensor, ctx: SiteContext) -> Tensor:
    """``fn(h, ctx)``, checked: same shape back, cast to ``h``'s dtype and device."""
    new = fn(h, ctx)
    if not isinstance(new, Tensor) or tuple(new.shape) != tuple(h.shape):
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise DictionaryError(f"the site function at {site} returned {got}, expected {tuple(h.shape)} "
                              "(a site function must return tokens of the shape it was given)")
    if new.dtype != h.dtype or new.device != h.device:
        new = new.to(device=h.device, dtype=h.dtype)
    return new


def edit_tokens(site: Site, fn: SiteFunction, x: Tensor, start: int, stop: int, ctx: SiteContext,
                before: Optional[Tensor] = None) -> Tensor:
    """Run ``fn`` on tokens ``x[:, start:stop]`` of ``(batch, tokens, d)`` and put the result back.

    With ``before`` (the block's input, same layout) the function sees the update ``x - before`` on
    those tokens, and what it adds to the update is added to ``x``. An unchanged result leaves the
    values bit-identical.
    """
    part = x[:, start:stop]
    if before is not None:
        update = part - before[:, start:stop]
        new = run_site(site, fn, update, ctx)
        edited = part + (new - update)  # exactly ``part`` when ``new`` equals ``update``
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
    """One model family's sites in ComfyUI, behind one interface.

    ``available_sites(model_patcher)`` lists the sites (``extra["d"]`` is their width);
    ``patch(model_patcher, {site: fn})`` returns a CLONE of the patcher with the functions installed,
    leaving the given patcher untouched. Patching a clone that already carries this plugin's patches
    (or another node's replacement) on the same block wraps them: both run, the earlier one first.
    """

    name = "comfy"

    def family(self, model_patcher: Any) -> str:
        raise NotImplementedError

    def available_sites(self, model_patcher: Any) -> list[Site]:
        raise NotImplementedError

    def patch(self, model_patcher: Any, site_functions: Mapping[Site, SiteFunction]) -> Any:
        raise NotImplementedError

    def resolve(self, model_patcher: Any, site: Site) -> Site:
        """The model's own site with ``site``'s block and stream (family checked, window ignored)."""
        family = self.family(model_patcher)
        if site.family not in (family, "unknown"):
            raise DictionaryError(f"site {site} is for a {site.family} model, but this MODEL is {family}; "
                                  "use a dictionary trained on this model family")
        sites = self.available_sites(model_patcher)
        own = find_site(sites, site)
        if own is None:
            raise DictionaryError(f"unknown site {site.name} for this {family} model; available sites: "
                                  + ", ".join(s.name for s in sites))
        return own

    def site_width(self, model_patcher: Any, site: Site) -> int:
        """Width ``d`` of the tokens at ``site``."""
        return int(self.resolve(model_patcher, site).extra["d"])

    def plan(self, model_patcher: Any, site_functions: Mapping[Site, SiteFunction]) -> dict[str, list]:
        """``{block: [(site, fn), ...]}`` in the mapping's order; every site checked before anything is patched."""
        if not site_functions:
            raise DictionaryError("no site functions given: pass {site: fn} for at least one site")
        grouped: dict[str, list] = {}
        for site, fn in site_functions.items():
            if not callable(fn):
                raise DictionaryError(f"the function for site {site} is not callable ({type(fn).__name__})")
            own = self.resolve(model_patcher, site)
            grouped.setdefault(own.block, []).append((own, fn))
        return grouped


def sites(family: str, names: Sequence[tuple[str, str, int]]) -> list[Site]:
    """Sites from ``(block, stream, d)`` triples."""
    return [Site(family=family, block=block, stream=stream, extra={"d": int(d)}) for block, stream, d in names]
