"""SD1.5 / SDXL in ComfyUI (``openaimodel.UNetModel``): sites on the U-Net's input, middle and output blocks.

Sites (names are ComfyUI's module paths): ``input_blocks.{i}``, ``middle_block``, ``output_blocks.{i}``.
Stream "residual": the block's OUTPUT map ``h`` (B, C, H, W) as tokens (B, H*W, C), row-major,
``ctx.grid = (H, W)``; ``d = C``. Stream "update": output minus input, offered where the block keeps
its input's shape (no resampler, same channels: e.g. SD1.5 ``input_blocks.1``, ``middle_block``; never
an output block, whose input is ``cat(h, skip)``). What a site function returns replaces the output
(for "update": what it adds to the update is added to the output).

Route, verified in ComfyUI 0.3.75 (``comfy/ldm/modules/diffusionmodules/openaimodel.py``,
``comfy/model_patcher.py``):

* The built-in hooks do not cover every block: ``input_block_patch`` sees input block i's output, but
  ``output_block_patch`` runs BEFORE output block i (it sees block i-1's output, so the last output
  block is out of reach) and 0.3.75 has no middle-block hook (newer ComfyUI adds
  ``middle_block_after_patch``).
* One route reaches all of them: ``UNetModel._forward`` runs every block through
  ``forward_timestep_embed(block, h, emb, context, transformer_options, ...)``, which iterates the
  block's layers. The clone gets ``add_object_patch("diffusion_model.<block>", wrapper)``, where the
  wrapper is a ``TimestepEmbedSequential`` holding the very same layers under the same names (weights,
  LoRA keys and state-dict paths are unchanged; nothing is copied) and whose iteration yields one
  extra layer before them (notes the block's input) and one after them (runs the site functions).
  ComfyUI installs object patches when it loads the clone and restores the original block when it
  unloads it, so the shared model never keeps our layers.
* The last layer needs the call's ``transformer_options`` (sigma, schedule, cond_or_uncond), which
  ``forward_timestep_embed`` passes only to known layer types, except through its own extension point:
  ``transformer_options["patches"]["forward_timestep_embed_patch"]`` = ``[(layer class, handler)]``,
  ``handler(layer, x, emb, context, transformer_options, output_shape, time_context,
  num_video_frames, image_only_indicator)`` (``ModelPatcher.set_model_forward_timestep_embed_patch``;
  present in 0.3.75 and kept by newer ComfyUI). The clone registers our layer class there. Without it
  the layer still runs, with an unknown context (sigma, progress and cond None).
* Chaining: a second patch of the same block on a clone wraps the wrapper; its input note runs first
  and its site layer last, so both patches run, the earlier one first.

Family rule: the MODEL's ``model_config`` class decides: ``comfy.supported_models.SDXL`` and its
subclasses (SSD-1B, Vega, KOALA, SDXL instruct-pix2pix) -> "sdxl"; ``SD15`` and its subclasses ->
"sd15". Any other config class falls back to its ``unet_config``: ``adm_in_channels == 2816`` with
``context_dim == 2048`` -> "sdxl"; no ``adm_in_channels``, ``context_dim == 768``, 4 input channels
and no temporal layers -> "sd15". Everything else (SD2.x, SDXL refiner, SVD, Zero123, x4 upscaler)
is not supported: its dictionaries would not be SD1.5's or SDXL's.

Revelio's names on SD1.5 (``REVELIO_BLOCKS``): "bottleneck" = ``middle_block:residual``; "up_ft1" /
"up_ft2" = the outputs of diffusers' ``up_blocks.1`` / ``up_blocks.2``. ComfyUI numbers the up path by
resnet: SD1.5 has 3 output blocks per up block (the last of each holds its upsampler), so up block j
ends at ``output_blocks.{3 j + 2}``: up_ft1 = ``output_blocks.5:residual``, up_ft2 =
``output_blocks.8:residual``.
"""
from __future__ import annotations

import dataclasses
import re

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from ...sae_core.errors import DictionaryError
from ...sae_core.intervention import SiteFunction
from ...sae_core.site import Site
from .common import CallInfo, ComfyAdapter, diffusion_model, run_site, sites, unsupported

INPUT, MIDDLE, OUTPUT = "input_blocks", "middle_block", "output_blocks"
EMBED_PATCH = "forward_timestep_embed_patch"
REVELIO_BLOCKS = {"bottleneck": "middle_block", "up_ft1": "output_blocks.5", "up_ft2": "output_blocks.8"}
"""Revelio's SD1.5 feature names -> ComfyUI block (stream "residual")."""


class _InputNote(nn.Module):
    """First extra layer of a patched block: keeps the block's input for "update" sites."""

    def __init__(self, keep: bool):
        super().__init__()
        self.keep = keep
        self.value: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        if self.keep:  # a copy: nothing downstream may change what the update is measured against
            self.value = x.clone()
        return x

    def take(self) -> Optional[Tensor]:
        value, self.value = self.value, None
        return value


class SiteLayer(nn.Module):
    """Last extra layer of a patched block: runs the site functions on the block's output."""

    def __init__(self, entries: list, note: _InputNote):
        super().__init__()
        self.entries = list(entries)
        object.__setattr__(self, "note", note)  # not a submodule: it is iterated by the block itself

    def forward(self, x: Tensor) -> Tensor:  # reached only if our handler is missing
        return self.run(x, None)

    def run(self, x: Tensor, transformer_options: Optional[Mapping[str, Any]]) -> Tensor:
        before = self.note.take()
        info = CallInfo(transformer_options, x.shape[0])
        ctx = info.context((int(x.shape[2]), int(x.shape[3])))
        layout = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        for site, fn in self.entries:
            tokens = x.flatten(2).transpose(1, 2)
            if site.stream == "update":
                if before is None or before.shape != x.shape:
                    raise DictionaryError(f"site {site}: the block's input was not seen or changed shape; "
                                          "choose the residual stream for this block")
                update = tokens - before.flatten(2).transpose(1, 2)
                new = run_site(site, fn, update.contiguous(), ctx)
                tokens = tokens + (new - update)
            else:
                tokens = run_site(site, fn, tokens.contiguous(), ctx)
            x = tokens.transpose(1, 2).reshape(x.shape)
        # Back to the layout the block produced: a channels-last view would send the next convolutions
        # down another kernel, and the results would no longer be bit-identical.
        return x.contiguous(memory_format=layout)


def _is_channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def site_layer_handler(layer, x, emb, context, transformer_options, *args, **kwargs):
    """``forward_timestep_embed_patch`` handler: our site layer with the call's transformer_options."""
    return layer.run(x, transformer_options)


def _sequential_class():
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    return TimestepEmbedSequential


def _site_block(base: nn.Module, entries: list) -> nn.Module:
    """A ``TimestepEmbedSequential`` with ``base``'s layers (same objects, same names) plus our two layers."""
    if not isinstance(base, nn.Sequential):
        raise DictionaryError(f"this U-Net block was replaced by another node with a {type(base).__name__}, "
                              "which cannot be patched again; put the SAE node before that node")

    block = _site_block_class()()
    for name, module in base._modules.items():
        block.add_module(name, module)
    note = _InputNote(keep=any(site.stream == "update" for site, _ in entries))
    inner_before, inner_after = getattr(base, "diffusion_sae_extra", ((), ()))
    object.__setattr__(block, "diffusion_sae_extra", ((note,) + tuple(inner_before),
                                                      tuple(inner_after) + (SiteLayer(entries, note),)))
    return block


_CLASS_CACHE: dict = {}


def _site_block_class():
    """``SiteBlock(TimestepEmbedSequential)``, made once ComfyUI is importable."""
    if "SiteBlock" not in _CLASS_CACHE:
        base = _sequential_class()

        class SiteBlock(base):
            """A U-Net block with site layers around its own; iteration (what ComfyUI runs) includes them."""

            def __iter__(self):
                before, after = self.diffusion_sae_extra
                yield from before
                yield from self._modules.values()
                yield from after

        _CLASS_CACHE["SiteBlock"] = SiteBlock
    return _CLASS_CACHE["SiteBlock"]


def _block_channels(block: nn.Module) -> tuple[Optional[int], Optional[int], bool]:
    """``(input channels, output channels, resamples)`` of a U-Net block, from its layers."""
    first = last = None
    resamples = False
    for layer in block._modules.values():
        name = type(layer).__name__
        if hasattr(layer, "channels") and hasattr(layer, "out_channels"):  # ResBlock, Up/Downsample
            lin, lout = int(layer.channels), int(layer.out_channels)
            resamples |= name in ("Upsample", "Downsample") or bool(getattr(layer, "updown", False))
        elif hasattr(layer, "in_channels") and hasattr(layer, "out_channels"):  # conv
            lin, lout = int(layer.in_channels), int(layer.out_channels)
        elif hasattr(layer, "in_channels"):  # SpatialTransformer keeps its width
            lin = lout = int(layer.in_channels)
        else:
            continue
        first = lin if first is None else first
        last = lout
    return first, last, resamples


def _blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = [(f"{INPUT}.{i}", b) for i, b in enumerate(net.input_blocks)]
    if getattr(net, "middle_block", None) is not None:
        blocks.append((MIDDLE, net.middle_block))
    blocks += [(f"{OUTPUT}.{i}", b) for i, b in enumerate(net.output_blocks)]
    return blocks


def _unet_family(model_patcher: Any) -> Optional[str]:
    config = getattr(model_patcher.model, "model_config", None)
    if config is None:
        return None
    import comfy.supported_models as models

    if isinstance(config, models.SDXL):
        return "sdxl"
    if isinstance(config, models.SD15):
        return "sd15"
    unet = getattr(config, "unet_config", {}) or {}
    temporal = unet.get("use_temporal_resblock") or unet.get("use_temporal_attention")
    if unet.get("adm_in_channels") == 2816 and unet.get("context_dim") == 2048 and not temporal:
        return "sdxl"
    if (unet.get("adm_in_channels") is None and unet.get("context_dim") == 768 and unet.get("in_channels") == 4
            and not temporal):
        return "sd15"
    return None


def is_unet(model_patcher: Any) -> bool:
    try:
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError:
        return False
    return type(diffusion_model(model_patcher)) is UNetModel


_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)$|^mid_block$")


def comfy_block_name(block: str, net: nn.Module) -> str:
    """A diffusers U-Net block name (``down_blocks.1``, ``mid_block``, ``up_blocks.1``) as the ComfyUI block
    whose output is the same tensor; other names are returned as they are.

    A diffusers down block ends with its downsampler (ComfyUI's separate input block after the level's
    resnets), except the last level's; an up block ends with its last resnet (+ attention + upsampler),
    ComfyUI's last output block of the level. With SD 1.5's layout (2 resnets per level, 4 levels):
    ``up_blocks.1`` -> ``output_blocks.5`` (Revelio's up_ft1), ``down_blocks.0`` -> ``input_blocks.3``.
    So a dictionary trained headless on a diffusers U-Net is used in ComfyUI by its own site name.
    """
    match = _DIFFUSERS_BLOCK.match(block)
    if match is None:
        return block
    if block == "mid_block":
        return "middle_block"
    per_level = list(getattr(net, "num_res_blocks", []))
    level = int(match.group(2))
    if not 0 <= level < len(per_level):
        raise DictionaryError(f"{block}: this U-Net has {len(per_level)} levels (down_blocks/up_blocks.0-{len(per_level) - 1})")
    if match.group(1) == "down_blocks":
        last_level = level == len(per_level) - 1
        return f"input_blocks.{sum(per_level[: level + 1]) + level + (0 if last_level else 1)}"
    return f"output_blocks.{sum(n + 1 for n in per_level[::-1][: level + 1]) - 1}"


class UNetAdapter(ComfyAdapter):
    """Sites on ComfyUI's SD1.5 / SDXL U-Net blocks (see the module docstring)."""

    name = "unet"

    def handles(self, model_patcher: Any) -> bool:
        return is_unet(model_patcher) and _unet_family(model_patcher) is not None

    def family(self, model_patcher: Any) -> str:
        family = _unet_family(model_patcher) if is_unet(model_patcher) else None
        if family is None:
            config = type(getattr(model_patcher.model, "model_config", None)).__name__
            raise unsupported(diffusion_model(model_patcher), f", {config} config")
        return family

    def available_sites(self, model_patcher: Any) -> list[Site]:
        family = self.family(model_patcher)
        names = []
        for name, block in _blocks(diffusion_model(model_patcher)):
            base = model_patcher.get_model_object(f"diffusion_model.{name}")
            first, last, resamples = _block_channels(base)
            if last is None:
                continue
            names.append((name, "residual", last))
            if first == last and not resamples:
                names.append((name, "update", last))
        return sites(family, names)

    def resolve(self, model_patcher: Any, site: Site) -> Site:
        """As for every adapter, after translating diffusers block names (see :func:`comfy_block_name`)."""
        block = comfy_block_name(site.block, diffusion_model(model_patcher))
        if block != site.block:
            site = dataclasses.replace(site, block=block)
        return super().resolve(model_patcher, site)

    def patch(self, model_patcher: Any, site_functions: Mapping[Site, SiteFunction]) -> Any:
        """A clone of ``model_patcher`` running ``site_functions`` at their sites (the input is untouched)."""
        plan = self.plan(model_patcher, site_functions)
        clone = model_patcher.clone()
        for block, entries in plan.items():
            key = f"diffusion_model.{block}"
            clone.add_object_patch(key, _site_block(clone.get_model_object(key), entries))
        options = clone.model_options.setdefault("transformer_options", {})
        handlers = options.get("patches", {}).get(EMBED_PATCH, [])
        if not any(entry[0] is SiteLayer for entry in handlers):
            clone.set_model_patch((SiteLayer, site_layer_handler), EMBED_PATCH)
        return clone


def revelio_site(name: str, model_patcher: Any = None) -> Site:
    """Revelio's SD1.5 feature name ("bottleneck", "up_ft1", "up_ft2") as a Site."""
    if name not in REVELIO_BLOCKS:
        raise DictionaryError(f"unknown Revelio feature {name!r}; use one of {', '.join(REVELIO_BLOCKS)}")
    site = Site(family="sd15", block=REVELIO_BLOCKS[name], stream="residual")
    if model_patcher is not None:
        return UNetAdapter().resolve(model_patcher, site)
    return site


__all__ = ["REVELIO_BLOCKS", "SiteLayer", "UNetAdapter", "comfy_block_name", "is_unet", "revelio_site", "site_layer_handler"]
