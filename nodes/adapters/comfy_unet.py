"""SD 1.5, SD 2.x, SDXL and the SDXL refiner in ComfyUI (``openaimodel.UNetModel``): sites on the U-Net's
input, middle and output blocks and on the spatial transformer inside a block.

Sites (names and their diffusers translations: :mod:`sae_core.sites.unet`): ``input_blocks.{k}``,
``middle_block``, ``output_blocks.{k}`` with stream "residual" (the block's OUTPUT map ``h`` (B, C, H, W)
as tokens (B, H*W, C), row-major, ``ctx.grid = (H, W)``; ``d = C``) and, where the block keeps its
input's shape, "update" (output minus input); ``<block>.1`` with stream "update": what the block's
spatial transformer (its layer "1") adds to its input. What a site function returns replaces the output
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
  LoRA keys and state-dict paths are unchanged; nothing is copied) and whose iteration yields extra
  layers around them: one before them (notes the block's input) and one after them (runs the block's
  site functions); for a transformer site, one right before layer "1" (notes its input) and one right
  after it. ComfyUI installs object patches when it loads the clone and restores the original block
  when it unloads it, so the shared model never keeps our layers.
* The site layers need the call's ``transformer_options`` (sigma, schedule, cond_or_uncond), which
  ``forward_timestep_embed`` passes only to known layer types, except through its own extension point:
  ``transformer_options["patches"]["forward_timestep_embed_patch"]`` = ``[(layer class, handler)]``,
  ``handler(layer, x, emb, context, transformer_options, output_shape, time_context,
  num_video_frames, image_only_indicator)`` (``ModelPatcher.set_model_forward_timestep_embed_patch``;
  present in 0.3.75 and kept by newer ComfyUI). The clone registers our layer class there. Without it
  the layers still run, with an unknown context (sigma, progress and cond None).
* Chaining: a second patch of the same block on a clone wraps the wrapper; its input notes run first
  and its site layers last (at the block's end, or right after layer "1"), so both patches run, the
  earlier one first.

Family rule: the MODEL's ``model_config`` class decides: ``comfy.supported_models.SDXLRefiner`` ->
"sdxl_refiner"; ``SDXL`` and its subclasses (SSD-1B, Vega, KOALA, SDXL instruct-pix2pix) -> "sdxl";
``SD15`` and its subclasses -> "sd15"; ``SD20`` and its subclasses (SD 2.1, the unCLIP models; v- or
eps-prediction alike: that comes from a weights key, not the class) -> "sd2", except the x4 upscaler
and Lotus (other tasks on the SD 2 layout). Any other config class falls back to its ``unet_config``
(4 input channels, no temporal layers): ``adm_in_channels`` 2816 with ``context_dim`` 2048 -> "sdxl",
2560 with 1280 -> "sdxl_refiner"; no ``adm_in_channels`` with ``context_dim`` 768 -> "sd15", 1024 ->
"sd2". Everything else (SVD, Zero123, upscalers, ...) is a SiteError: its dictionaries would not be
these families'. The blocks come from the network itself (``model_channels``, ``channel_mult``,
``num_res_blocks``, which blocks hold a ``SpatialTransformer``), so SSD-1B's or KOALA's layouts are
listed as they are.

Revelio's SD 1.5 feature names (``REVELIO_BLOCKS``, from :mod:`sae_core.sites`): "bottleneck" =
``middle_block:residual``; "up_ft1" / "up_ft2" = the outputs of diffusers' ``up_blocks.1`` / ``.2``,
on SD 1.5 ``output_blocks.5:residual`` / ``output_blocks.8:residual``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from ...sae_core.errors import SiteError
from ...sae_core.sites import REVELIO_BLOCKS, Catalogue, Site, SiteFunction, unet_catalogue
from ...sae_core.sites.unet import SHAPES, UNetShape
from .common import ComfyAdapter, comfy_context, diffusion_model, run_site

EMBED_PATCH = "forward_timestep_embed_patch"
TRANSFORMER_LAYER = "1"
"""The spatial transformer's name inside a U-Net block (after the ResBlock "0")."""


class _InputNote(nn.Module):
    """An extra layer before a block (or before its transformer): keeps the input for "update" sites."""

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
    """An extra layer after a block (or after its transformer): runs the site functions on that output."""

    def __init__(self, entries: list, note: _InputNote):
        super().__init__()
        self.entries = list(entries)
        object.__setattr__(self, "note", note)  # not a submodule: it is iterated by the block itself

    def forward(self, x: Tensor) -> Tensor:  # reached only if our handler is missing
        return self.run(x, None)

    def run(self, x: Tensor, transformer_options: Optional[Mapping[str, Any]]) -> Tensor:
        before = self.note.take()
        ctx = comfy_context(transformer_options, x.shape[0]).at((int(x.shape[2]), int(x.shape[3])))
        layout = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        for site, fn in self.entries:
            tokens = x.flatten(2).transpose(1, 2)
            if site.stream == "update":
                if before is None or before.shape != x.shape:
                    raise SiteError(f"site {site}: the block's input was not seen or changed shape; "
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


@dataclass(frozen=True)
class _Extras:
    """The extra layers a patched block yields: before and after its own, and around one of its own."""

    before: tuple = ()
    after: tuple = ()
    around: Mapping[str, tuple[tuple, tuple]] = field(default_factory=dict)


def _site_block(base: nn.Module, entries: list, inner: Mapping[str, list]) -> nn.Module:
    """A ``TimestepEmbedSequential`` with ``base``'s layers (same objects, same names) and our layers
    around them: ``entries`` run on the block's output, ``inner[layer]`` on that layer's output."""
    if not isinstance(base, nn.Sequential):
        raise SiteError(f"this U-Net block was replaced by another node with a {type(base).__name__}, "
                        "which cannot be patched again; put the SAE node before that node")
    block = _site_block_class()()
    for name, module in base._modules.items():
        block.add_module(name, module)
    extras: _Extras = getattr(base, "diffusion_sae_extra", _Extras())
    before, after, around = extras.before, extras.after, dict(extras.around)
    if entries:
        note = _InputNote(keep=any(site.stream == "update" for site, _ in entries))
        before, after = (note,) + before, after + (SiteLayer(entries, note),)
    for layer, layer_entries in inner.items():
        if layer not in base._modules:
            raise SiteError(f"this U-Net block has no layer {layer!r} (its layers: {', '.join(base._modules)})")
        note = _InputNote(keep=True)
        earlier_before, earlier_after = around.get(layer, ((), ()))
        around[layer] = ((note,) + earlier_before, earlier_after + (SiteLayer(layer_entries, note),))
    object.__setattr__(block, "diffusion_sae_extra", _Extras(before, after, around))
    return block


_CLASS_CACHE: dict = {}


def _site_block_class():
    """``SiteBlock(TimestepEmbedSequential)``, made once ComfyUI is importable."""
    if "SiteBlock" not in _CLASS_CACHE:
        from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

        class SiteBlock(TimestepEmbedSequential):
            """A U-Net block with site layers around its own; iteration (what ComfyUI runs) includes them."""

            def __iter__(self):
                extras: _Extras = self.diffusion_sae_extra
                yield from extras.before
                for name, layer in self._modules.items():
                    ahead, behind = extras.around.get(name, ((), ()))
                    yield from ahead
                    yield layer
                    yield from behind
                yield from extras.after

        _CLASS_CACHE["SiteBlock"] = SiteBlock
    return _CLASS_CACHE["SiteBlock"]


# ----------------------------------------------------------------------------- family and shape


def _config_family(config: Any) -> Optional[str]:
    """The site family of a ``model_config`` (see the module docstring); None for other U-Nets."""
    import comfy.supported_models as models

    refused = tuple(c for c in (getattr(models, "SD_X4Upscaler", None), getattr(models, "LotusD", None)) if c)
    if refused and isinstance(config, refused):
        return None
    for class_name, family in (("SDXLRefiner", "sdxl_refiner"), ("SDXL", "sdxl"), ("SD15", "sd15"), ("SD20", "sd2")):
        config_class = getattr(models, class_name, None)
        if config_class is not None and isinstance(config, config_class):
            return family
    unet = getattr(config, "unet_config", {}) or {}
    if unet.get("use_temporal_resblock") or unet.get("use_temporal_attention") or unet.get("in_channels", 4) != 4:
        return None
    by_conditioning = {(2816, 2048): "sdxl", (2560, 1280): "sdxl_refiner", (None, 768): "sd15", (None, 1024): "sd2"}
    return by_conditioning.get((unet.get("adm_in_channels"), unet.get("context_dim")))


def _unet_family(model_patcher: Any) -> Optional[str]:
    config = getattr(model_patcher.model, "model_config", None)
    return None if config is None else _config_family(config)


def is_unet(model_patcher: Any) -> bool:
    try:
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError:
        return False
    return type(diffusion_model(model_patcher)) is UNetModel


def _attends(block: nn.Module) -> bool:
    from comfy.ldm.modules.attention import SpatialTransformer

    return isinstance(block._modules.get(TRANSFORMER_LAYER), SpatialTransformer)


def _level_attends(flags: list[bool], level: int, path: str) -> bool:
    if any(flags) and not all(flags):
        raise SiteError(f"this U-Net has spatial transformers in only some {path} blocks of level {level} "
                        "(num_attention_blocks); such layouts have no sites here")
    return all(flags)


def unet_shape(net: nn.Module) -> UNetShape:
    """The numbers of a ComfyUI ``UNetModel``: its channel settings, and which blocks hold a transformer."""
    mult = tuple(int(m) for m in net.channel_mult)
    res = tuple(int(n) for n in net.num_res_blocks)
    levels = len(mult)
    inputs = [_attends(block) for block in net.input_blocks]
    outputs = [_attends(block) for block in net.output_blocks]
    if len(inputs) != sum(res) + levels or len(outputs) != sum(res) + levels:
        raise SiteError(f"this U-Net has {len(inputs)} input and {len(outputs)} output blocks, not the "
                        f"{sum(res) + levels} each that channel_mult {mult} and num_res_blocks {res} make")
    attention, output_attention = [], [False] * levels
    k = 1
    for level, n in enumerate(res):
        attention.append(_level_attends(inputs[k:k + n], level, "input"))
        k += n + 1
    k = 0
    for level in reversed(range(levels)):
        output_attention[level] = _level_attends(outputs[k:k + res[level] + 1], level, "output")
        k += res[level] + 1
    middle = getattr(net, "middle_block", None)
    return UNetShape(int(net.model_channels), mult, res, tuple(attention),
                     middle_attention=middle is not None and _attends(middle), has_middle=middle is not None,
                     output_attention=tuple(output_attention))


def context_width(net: nn.Module) -> Optional[int]:
    """The width of the prompt's tokens (``c_crossattn``) every cross-attention reads (its key projection's
    input); None for a U-Net without cross-attention or whose blocks read different widths."""
    widths = {int(m.attn2.to_k.in_features) for m in net.modules() if hasattr(getattr(m, "attn2", None), "to_k")}
    return widths.pop() if len(widths) == 1 else None


class UNetAdapter(ComfyAdapter):
    """Sites on ComfyUI's SD 1.5 / SD 2.x / SDXL / SDXL refiner U-Nets (see the module docstring)."""

    name = "unet"

    def handles(self, model_patcher: Any) -> bool:
        return is_unet(model_patcher) and _unet_family(model_patcher) is not None

    def catalogue(self, model_patcher: Any) -> Catalogue:
        net = diffusion_model(model_patcher)
        family = _unet_family(model_patcher) if is_unet(model_patcher) else None
        if family is None:
            config = type(getattr(model_patcher.model, "model_config", None)).__name__
            raise SiteError(f"this {type(net).__name__} ({config} config) is not an SD 1.5, SD 2.x, SDXL or SDXL "
                            "refiner U-Net, so it has no sites here (SVD, Zero123 and upscalers are not supported)")
        return unet_catalogue(family, unet_shape(net), context_width=context_width(net))

    def install(self, model_patcher: Any, plan: Mapping[str, list]) -> Any:
        """A clone of ``model_patcher`` running the plan's site functions (the input is untouched)."""
        catalogue = self.catalogue(model_patcher)
        edits: dict[str, tuple[list, dict[str, list]]] = {}
        for block, entries in plan.items():
            if catalogue.block(block).role == "attention":  # "<block>.1": the transformer inside <block>
                owner, layer = block.rsplit(".", 1)
                edits.setdefault(owner, ([], {}))[1].setdefault(layer, []).extend(entries)
            else:
                edits.setdefault(block, ([], {}))[0].extend(entries)
        clone = model_patcher.clone()
        for block, (entries, inner) in edits.items():
            key = f"diffusion_model.{block}"
            clone.add_object_patch(key, _site_block(clone.get_model_object(key), entries, inner))
        options = clone.model_options.setdefault("transformer_options", {})
        handlers = options.get("patches", {}).get(EMBED_PATCH, [])
        if not any(entry[0] is SiteLayer for entry in handlers):
            clone.set_model_patch((SiteLayer, site_layer_handler), EMBED_PATCH)
        return clone


def revelio_site(name: str, model_patcher: Any = None) -> Site:
    """Revelio's SD 1.5 feature name ("bottleneck", "up_ft1", "up_ft2") as this MODEL's site (without a
    MODEL: SD 1.5's own)."""
    if name not in REVELIO_BLOCKS:
        raise SiteError(f"unknown Revelio feature {name!r}; use one of {', '.join(REVELIO_BLOCKS)}")
    wanted = Site(family="sd15", block=REVELIO_BLOCKS[name], stream="residual")
    if model_patcher is None:
        return unet_catalogue("sd15", SHAPES["sd15"]).resolve(wanted)
    return UNetAdapter().resolve(model_patcher, wanted)


__all__ = ["REVELIO_BLOCKS", "SiteLayer", "UNetAdapter", "is_unet", "revelio_site", "site_layer_handler", "unet_shape"]
