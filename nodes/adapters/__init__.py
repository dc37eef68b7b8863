"""Model adapters for ComfyUI: where a site is inside one of ComfyUI's own models, behind one interface.

    adapter = adapter_for(model)                 # model: a ComfyUI MODEL (ModelPatcher)
    adapter.available_sites(model)               # [Site(family, block, stream, extra={"d": width})]
    patched = adapter.patch(model, {site: fn})   # a CLONE with fn(h, ctx) -> h running at the site

A site function gets the site's own tokens ``(batch, tokens, d)`` (image OR text, never both) and a
``SiteContext(sigma, progress, cond, grid)``; what it returns replaces them (sae_core.intervention).
``patch`` never changes the patcher it is given, and patching a clone that already carries patches on
the same block keeps them: nodes chain (capture, then steer, on one block: both run, in that order).
A function that keeps ``h`` must copy it: ComfyUI may later edit block outputs in place (ControlNet).

Families (the rule; details in each module):

* "flux": the diffusion model is exactly ``comfy.ldm.flux.model.Flux`` and the MODEL is not Flux 2
  (``comfy_flux.FluxAdapter``: double blocks image/text/update, single blocks image/update);
* "sd15" / "sdxl": the diffusion model is exactly ``openaimodel.UNetModel`` and its ``model_config`` is
  ``supported_models.SD15`` / ``SDXL`` (or a config whose ``unet_config`` says SD1.5's context_dim 768
  without adm, or SDXL's adm_in_channels 2816 with context_dim 2048) (``comfy_unet.UNetAdapter``:
  input/middle/output blocks, residual and, where the shape is kept, update);
* anything else (SD3/MMDiT, Chroma, Flux 2, Qwen-Image, SD2.x, video models, ...) raises
  DictionaryError naming what is supported.
"""
from __future__ import annotations

from typing import Any

from .common import SUPPORTED, ComfyAdapter, diffusion_model, unsupported
from .comfy_flux import FluxAdapter, is_flux2
from .comfy_unet import REVELIO_BLOCKS, UNetAdapter, is_unet, revelio_site

ADAPTERS: tuple[ComfyAdapter, ...] = (FluxAdapter(), UNetAdapter())


def adapter_for(model_patcher: Any) -> ComfyAdapter:
    """The adapter for this ComfyUI MODEL; DictionaryError for a model we have no sites for."""
    net = diffusion_model(model_patcher)
    for adapter in ADAPTERS:
        if adapter.handles(model_patcher):
            return adapter
    detail = ""
    if is_flux2(model_patcher) and type(net).__name__ == "Flux":
        detail = ", Flux 2"
    elif is_unet(model_patcher):  # a U-Net, but neither SD1.5 nor SDXL
        detail = f", {type(getattr(model_patcher.model, 'model_config', None)).__name__} config"
    raise unsupported(net, detail)


__all__ = ["ADAPTERS", "REVELIO_BLOCKS", "SUPPORTED", "ComfyAdapter", "FluxAdapter", "UNetAdapter", "adapter_for",
           "revelio_site"]
