"""Model adapters for ComfyUI: where a site is inside one of ComfyUI's own models, behind one interface.

    adapter = adapter_for(model)                 # model: a ComfyUI MODEL (ModelPatcher)
    adapter.available_sites(model)               # [Site(family, block, stream, extra={"d": width})]
    site = adapter.resolve(model, "transformer_blocks.3:image")   # any runtime's name -> the model's own site
    patched = adapter.patch(model, {site: fn})   # a CLONE with fn(h, ctx) -> h running at the site

A site function gets the site's own tokens ``(batch, tokens, d)`` (image OR text, never both) and a
``SiteContext`` (sigma, progress, cond rows, grid, frames, timestep; ``sae_core.sites``); what it
returns replaces them. ``patch`` never changes the patcher it is given, and patching a clone that
already carries patches on the same block keeps them: nodes chain (capture, then steer, on one block:
both run, in that order). A function that keeps ``h`` must copy it: blocks and ComfyUI may later edit
block outputs in place.

Adapters (the family rules are in each module):

* ``comfy_dit.DitAdapter``: transformers with ComfyUI block replacement (``patches_replace["dit"]``):
  FLUX.1, FLUX.2, Chroma, HunyuanVideo, AuraFlow, Qwen-Image, SD3/SD3.5, Wan 2.x, LTX-Video;
* ``comfy_hooks.HookAdapter``: transformers without a patch point, by forward hooks that live for one
  model call: Lumina 2 / Z-Image, HiDream-I1;
* ``comfy_unet.UNetAdapter``: ``openaimodel.UNetModel`` (SD 1.5, SD 2.x, SDXL, the SDXL refiner).

Every family but HiDream also has the conditioning site ``context:text``: the prompt's tokens as
``BaseModel.apply_model`` hands them to the network (``c_crossattn``), edited by an APPLY_MODEL wrapper
before the network runs (``common.ComfyAdapter.apply``), so a steer there reaches every block.

Anything else raises a SiteError naming the supported families.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from ...sae_core.sites import Site, SiteFunction

from .common import SUPPORTED, ComfyAdapter, diffusion_model, unsupported
from .comfy_dit import DitAdapter
from .comfy_hooks import HookAdapter
from .comfy_unet import REVELIO_BLOCKS, UNetAdapter, revelio_site

ADAPTERS: tuple[ComfyAdapter, ...] = (DitAdapter(), HookAdapter(), UNetAdapter())


def adapter_for(model_patcher: Any) -> ComfyAdapter:
    """The adapter for this ComfyUI MODEL; SiteError, naming the supported families, for any other."""
    net = diffusion_model(model_patcher)
    for adapter in ADAPTERS:
        if adapter.handles(model_patcher):
            return adapter
    raise unsupported(net, f" in a {type(model_patcher.model).__name__} model")


def patch_site(model_patcher: Any, site: Union[Site, str], fn: SiteFunction,
               width: Optional[int] = None) -> tuple[Any, Site]:
    """``(clone, resolved site)``: a clone of the MODEL running ``fn`` at ``site`` (a name in either runtime's
    naming), the site resolved once and, with ``width`` (a dictionary's ``d_in``), its width checked first."""
    adapter = adapter_for(model_patcher)
    plan = adapter.plan(model_patcher, {site: fn}, {site: width} if width is not None else None)
    (resolved, _), = next(iter(plan.values()))
    return adapter.apply(model_patcher, plan), resolved


__all__ = ["ADAPTERS", "REVELIO_BLOCKS", "SUPPORTED", "ComfyAdapter", "DitAdapter", "HookAdapter", "UNetAdapter",
           "adapter_for", "patch_site", "revelio_site"]
