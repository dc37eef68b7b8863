"""SD1.5 / SDXL in diffusers (``UNet2DConditionModel``): sites on the U-Net's blocks and attentions.

Verified in diffusers 0.42.1, ``models/unets/unet_2d_condition.py`` and ``unet_2d_blocks.py``:

* ``down_blocks[i]`` is called as ``block(hidden_states=sample, temb=..., ...)`` and returns
  ``(hidden_states, output_states)``; the last skip in ``output_states`` is the very tensor returned as
  ``hidden_states``, so an edit replaces it in both places (the matching up block sees it too).
* ``mid_block(sample, emb, ...)`` and ``up_blocks[i](hidden_states=sample, res_hidden_states_tuple=...,
  ...)`` return the hidden state tensor.
* ``*.attentions[j]`` (Transformer2DModel) is called as ``attn(hidden_states, ..., return_dict=False)``
  and returns ``(sample,)``, its input plus its own residual update (same shape).

Sites (stream "residual": the block's output map (B, C, H, W) as (B, H*W, C) tokens, grid (H, W);
stream "update": output minus input):
``down_blocks.{i}``, ``mid_block``, ``up_blocks.{i}``: "residual", and "update" where the block keeps
its input's shape (no resampler, same channels: the mid block, rarely another);
``down_blocks.{i}.attentions.{j}``, ``mid_block.attentions.{j}``, ``up_blocks.{i}.attentions.{j}``:
"update" (SDLens: down_blocks.2.attentions.1, mid_block.attentions.0, up_blocks.0.attentions.0/1 of SDXL).

Revelio's names for SD1.5: "bottleneck" = ``mid_block:residual``; "up_ft1" / "up_ft2" = the outputs of
``up_blocks.1`` / ``up_blocks.2`` (``up_blocks.1:residual`` / ``up_blocks.2:residual``).

Family: "sdxl" when the U-Net takes SDXL's added time/text embedding (``addition_embed_type ==
"text_time"``), else "sd15". Sigma: the U-Net gets a DDPM timestep index, which says nothing about
sigma without the scheduler; :class:`training.adapters.SamplingState` converts it.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from sae_core.site import Site

from .base import Adapter, ModelCall, Tap, first_value, site_list


def _out_channels(block: nn.Module) -> int:
    return int(block.resnets[-1].out_channels)


def _keeps_shape(block: nn.Module, in_channels: int) -> bool:
    resampled = getattr(block, "downsamplers", None) is not None or getattr(block, "upsamplers", None) is not None
    return not resampled and in_channels == _out_channels(block)


def _is_transformer(module: nn.Module) -> bool:
    """Transformer2DModel attentions are sites; other attention kinds return other things."""
    return any(cls.__name__ == "Transformer2DModel" for cls in type(module).__mro__)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, block, input channels)`` in the order the U-Net runs them."""
    blocks = []
    channels = int(model.conv_in.out_channels)
    stages = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
    if model.mid_block is not None:
        stages.append(("mid_block", model.mid_block))
    stages += [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]
    for name, block in stages:
        blocks.append((name, block, channels))
        channels = _out_channels(block)
    return blocks


class UNetAdapter(Adapter):
    model_classes = ("UNet2DConditionModel",)

    def family(self, model: nn.Module) -> str:
        return "sdxl" if model.config.get("addition_embed_type") == "text_time" else "sd15"

    def available_sites(self, model: nn.Module) -> list[Site]:
        names = []
        for name, block, in_channels in _blocks(model):
            names.append((name, "residual", _out_channels(block)))
            if _keeps_shape(block, in_channels):
                names.append((name, "update", in_channels))
            for j, attention in enumerate(getattr(block, "attentions", None) or []):
                if _is_transformer(attention):
                    names.append((f"{name}.attentions.{j}", "update", int(attention.config.in_channels)))
        return site_list(self.family(model), names)

    def tap(self, model: nn.Module, site: Site) -> Tap:
        module = model.get_submodule(site.block)
        if ".attentions." in site.block:
            return Tap(module, 0, "spatial", update=True)
        if site.block.startswith("down_blocks."):
            return Tap(module, 0, "spatial", update=site.stream == "update", skips=1)
        return Tap(module, None, "spatial", update=site.stream == "update")

    def model_call(self, model: nn.Module, arguments: Mapping[str, Any]) -> ModelCall:
        return ModelCall(batch=int(arguments["sample"].shape[0]), timestep=first_value(arguments.get("timestep")),
                         sigma=None, grid=None)
