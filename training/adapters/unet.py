"""SD 1.5, SD 2.x, SDXL and the SDXL refiner in diffusers (``UNet2DConditionModel``).

The sites are ComfyUI's (:mod:`sae_core.sites.unet`: ``input_blocks.{k}``, ``middle_block``,
``output_blocks.{k}`` with "residual" and, where the shape is kept, "update"; ``<block>.1:update`` for
a block's spatial transformer), built from the diffusers config, so a dictionary moves between the
runtimes by its site name. diffusers' own names (``down_blocks.1``, ``up_blocks.1``, ``mid_block``,
``down_blocks.2.attentions.1``, ...) resolve to the site with the same tensor.

Where a site's tensor is (verified in diffusers 0.42.1, ``models/unets/unet_2d_blocks.py``): the
output of the block's diffusers module (``catalogue.module(site, "diffusers")``): ``conv_in``,
``down_blocks.l.resnets.r`` / ``.attentions.r`` / ``.downsamplers.0``, ``mid_block``,
``up_blocks.j.resnets.r`` / ``.attentions.r`` / ``.upsamplers.0``. Each down block puts exactly that
tensor into its skip connections and hands it on, so an edit there reaches the skip and the next module
alike, as in ComfyUI. ``Transformer2DModel`` (an ``attentions.r``) returns ``(sample,)``, the other
modules the tensor itself. A block that is a resnet plus a transformer ends at the transformer and
begins at the resnet: its "update" is the transformer's output minus the resnet's input
(``Tap.input_module``).

Family, from the config: ``addition_embed_type == "text_time"`` (SDXL's added size/crop embedding):
"sdxl_refiner" with ``cross_attention_dim`` 1280 (OpenCLIP bigG's text tokens alone), else "sdxl";
otherwise "sd2" with ``cross_attention_dim`` 1024 (OpenCLIP ViT-H), else "sd15". U-Nets the catalogue
cannot describe (other block kinds, the class-conditioned x4 upscaler, widths that are not multiples of the
first) are a SiteError. Sigma: the U-Net gets a DDPM timestep index, which says nothing about sigma
without the scheduler; :class:`training.adapters.SamplingState` converts it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from sae_core import SiteError
from sae_core.sites import CONTEXT, Catalogue, Site, first_float, unet_catalogue
from sae_core.sites.unet import UNetShape

from .base import Adapter, ModelCall, Tap, context_tap

DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False}
"""Block type -> whether it holds spatial transformers (``Transformer2DModel``)."""


def unet_family(config: Mapping[str, Any]) -> str:
    """"sd15", "sd2", "sdxl" or "sdxl_refiner" from a ``UNet2DConditionModel`` config (see the module docstring)."""
    context = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time":
        return "sdxl_refiner" if context == 1280 else "sdxl"
    return "sd2" if context == 1024 else "sd15"


def _per_level(value: Any, levels: int, name: str) -> tuple[int, ...]:
    values = (value,) * levels if isinstance(value, int) else tuple(value)
    if len(values) != levels:
        raise SiteError(f"this U-Net's {name} {value!r} does not give one value per level ({levels})")
    return tuple(int(v) for v in values)


def _kinds(types: Any, known: Mapping[str, bool], what: str) -> tuple[bool, ...]:
    unknown = sorted(set(types) - set(known))
    if unknown:
        raise SiteError(f"this U-Net has {what} blocks {unknown}, which have no sites here; supported: "
                        + ", ".join(known))
    return tuple(known[t] for t in types)


def unet_shape(config: Mapping[str, Any]) -> UNetShape:
    """The catalogue's numbers from a ``UNet2DConditionModel`` config; SiteError for a U-Net it cannot describe."""
    if config.get("num_class_embeds") is not None:
        raise SiteError("this U-Net takes class labels (the x4 upscaler's noise level): it is not an SD 1.5, "
                        "SD 2.x, SDXL or SDXL refiner U-Net and has no sites here")
    widths = [int(c) for c in config["block_out_channels"]]
    base = widths[0]
    if any(w % base for w in widths):
        raise SiteError(f"this U-Net's block_out_channels {widths} are not multiples of the first; no sites here")
    levels = len(widths)
    down = _kinds(config["down_block_types"], DOWN_BLOCKS, "down")
    up = _kinds(config["up_block_types"], UP_BLOCKS, "up")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    middle = mid_type is not None
    if middle:
        _kinds([mid_type], MID_BLOCKS, "middle")
    if len(down) != levels or len(up) != levels:
        raise SiteError(f"this U-Net has {len(down)} down and {len(up)} up blocks for {levels} widths; no sites here")
    return UNetShape(base, tuple(w // base for w in widths),
                     _per_level(config["layers_per_block"], levels, "layers_per_block"), down,
                     middle_attention=middle and MID_BLOCKS[mid_type], has_middle=middle,
                     output_attention=tuple(reversed(up)))  # up_blocks[0] is the deepest level


def context_width(config: Mapping[str, Any]) -> Optional[int]:
    """The width of the text tokens every cross-attention reads, where the U-Net reads them as given
    (no ``encoder_hid_proj`` in between, a single width for every block); else None: no conditioning site."""
    width = config.get("cross_attention_dim")
    if config.get("encoder_hid_dim") is not None or not isinstance(width, int):
        return None
    return width


class UNetAdapter(Adapter):
    model_classes = ("UNet2DConditionModel",)

    def catalogue(self, model: nn.Module) -> Catalogue:
        return unet_catalogue(unet_family(model.config), unet_shape(model.config), context_width=context_width(model.config))

    def tap(self, model: nn.Module, site: Site) -> Tap:
        catalogue = self.catalogue(model)
        own = catalogue.resolve(site)
        if own.block == CONTEXT:
            return context_tap(model)
        block = catalogue.block(own.block)
        path, start = block.module("diffusers"), block.input_module("diffusers")
        update = own.stream == "update"
        return Tap(model.get_submodule(path), 0 if ".attentions." in path else None, "spatial", update=update,
                   input_module=model.get_submodule(start) if update and start != path else None)

    def model_call(self, model: nn.Module, arguments: Mapping[str, Any]) -> ModelCall:
        return ModelCall(batch=int(arguments["sample"].shape[0]), timestep=first_float(arguments.get("timestep")),
                         sigma=None, grid=None)
