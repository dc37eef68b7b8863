"""U-Net sites (SD 1.5, SD 2.x, SDXL, the SDXL refiner) from the U-Net's structural numbers.

Canonical names are ComfyUI's ``openaimodel.UNetModel`` blocks: ``input_blocks.{k}``,
``middle_block``, ``output_blocks.{k}`` (stream "residual": the block's output map as ``(B, H*W, C)``
tokens; "update": output minus input, where the block keeps its input's shape), and the spatial
transformer inside a block, ``<block>.1`` (stream "update": what the transformer adds, SDLens's
target). Each is also named by the diffusers ``UNet2DConditionModel`` module whose output is the same
tensor, so the two runtimes translate both ways:

* ``input_blocks.0`` is ``conv_in``. Input level ``l`` (``down_blocks.l``), resnet ``r``:
  ``input_blocks.k`` is diffusers' resnet ``r`` followed by attention ``r`` (its output:
  ``down_blocks.l.attentions.r``, else ``.resnets.r``; its input: ``.resnets.r``'s); the level's
  downsampler is the next input block (``down_blocks.l.downsamplers.0``). ``down_blocks.l`` itself
  means the block that ends the level (the downsampler; on the last level, its last resnet block).
* ``middle_block`` is ``mid_block``; its transformer ``middle_block.1`` is ``mid_block.attentions.0``.
* Output level ``j`` (``up_blocks.j``, deepest first) has ``n + 1`` blocks per ``n`` input resnets;
  the last one holds the upsampler (``up_blocks.j.upsamplers.0``), except on the last level.
  ``up_blocks.j`` means the block that ends the level (Revelio's up_ft1 on SD 1.5 = ``up_blocks.1`` =
  ``output_blocks.5``).
* ``down_blocks.l.attentions.r`` (an SDLens site name) means the transformer ``input_blocks.k.1``; on
  SDXL SDLens's ``down_blocks.2.attentions.1`` is ``input_blocks.8.1`` and ``up_blocks.0.attentions.1``
  is ``output_blocks.1.1``.

ComfyUI's own key map (``comfy.utils.unet_to_diffusers``) pairs the same modules; tests check the two
against each other on the released layouts (:data:`SHAPES`) and by value on tiny models.

One old name does not keep its tensor: a diffusers last down block that kept its shape (SD 1.5's
``down_blocks.3``, two resnets) offered "update" over the whole block; ``down_blocks.3:update`` now
means the update of its last resnet block, ``input_blocks.11:update``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import SiteError
from .catalogue import Block, Catalogue, context_block

REVELIO_BLOCKS = {"bottleneck": "middle_block", "up_ft1": "up_blocks.1", "up_ft2": "up_blocks.2"}
"""Revelio's SD 1.5 feature names -> block (stream "residual")."""


@dataclass(frozen=True)
class UNetShape:
    """The numbers that fix a U-Net's blocks."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    """Resnets per input level (ComfyUI's list; one output level has one more block)."""
    attention: tuple[bool, ...]
    """Whether each level's input blocks hold a spatial transformer."""
    middle_attention: bool = True
    has_middle: bool = True
    output_attention: Optional[tuple[bool, ...]] = None
    """Whether each level's output blocks hold one (indexed by level, shallowest first); None: as ``attention``.
    Released models agree with ``attention``; a hand-made config need not (ComfyUI and diffusers allow it)."""

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        lists = {"num_res_blocks": self.num_res_blocks, "attention": self.attention,
                 "output_attention": self.output_attention or self.attention}
        wrong = {name: len(value) for name, value in lists.items() if len(value) != levels}
        if wrong or not levels:
            raise SiteError(f"U-Net shape with {levels} levels (channel_mult {self.channel_mult}) has lists of "
                            f"other lengths: {wrong}")

    @property
    def outputs_attend(self) -> tuple[bool, ...]:
        """Per level, whether its output blocks hold a spatial transformer."""
        return self.output_attention if self.output_attention is not None else self.attention


SHAPES = {
    "sd15": UNetShape(320, (1, 2, 4, 4), (2, 2, 2, 2), (True, True, True, False)),
    "sd2": UNetShape(320, (1, 2, 4, 4), (2, 2, 2, 2), (True, True, True, False)),
    "sdxl": UNetShape(320, (1, 2, 4), (2, 2, 2), (False, True, True)),
    "sdxl_refiner": UNetShape(384, (1, 2, 4, 4), (2, 2, 2, 2), (False, True, True, False)),
}
"""The released checkpoints' shapes (ComfyUI's ``supported_models`` and diffusers' configs agree), for
names asked without a model at hand (Revelio's) and for checks of the naming."""


def _block(name: str, width: int, update: bool, diffusers: str, role: str, aliases: Sequence[str] = (),
           diffusers_input: str = "") -> Block:
    streams = {"residual": width, **({"update": width} if update else {})}
    inputs = {"diffusers": diffusers_input} if diffusers_input else {}
    return Block(name, streams, {"diffusers": diffusers}, tuple(aliases), role=role, inputs=inputs)


def _attention(owner: str, width: int, diffusers: str) -> Block:
    return Block(f"{owner}.1", {"update": width}, {"diffusers": diffusers}, (diffusers,), role="attention")


def unet_catalogue(family: str, shape: UNetShape, compatible: Sequence[str] = (),
                   context_width: Optional[int] = None) -> Catalogue:
    """Every block of a U-Net with this shape, in the order it runs, with both runtimes' names; with
    ``context_width`` (the cross-attention's text width) the conditioning site ``context:text`` first."""
    widths = [shape.model_channels * m for m in shape.channel_mult]
    levels = len(widths)
    blocks: list[Block] = [context_block(context_width)] if context_width else []
    blocks.append(_block("input_blocks.0", shape.model_channels, False, "conv_in", "input"))
    attentions: list[Block] = []
    k, channels = 1, shape.model_channels
    for level, (width, n) in enumerate(zip(widths, shape.num_res_blocks)):
        for r in range(n):
            out = f"down_blocks.{level}.{'attentions' if shape.attention[level] else 'resnets'}.{r}"
            ends_level = level == levels - 1 and r == n - 1
            aliases = [f"down_blocks.{level}"] if ends_level else []
            blocks.append(_block(f"input_blocks.{k}", width, channels == width, out, "input", aliases,
                                 diffusers_input=f"down_blocks.{level}.resnets.{r}"))
            if shape.attention[level]:
                attentions.append(_attention(f"input_blocks.{k}", width, out))
            channels, k = width, k + 1
        if level != levels - 1:
            blocks.append(_block(f"input_blocks.{k}", width, False, f"down_blocks.{level}.downsamplers.0", "input",
                                 [f"down_blocks.{level}"]))
            k += 1
    if shape.has_middle:
        blocks.append(_block("middle_block", channels, True, "mid_block", "middle"))
        if shape.middle_attention:
            attentions.append(_attention("middle_block", channels, "mid_block.attentions.0"))
    k = 0
    for j, level in enumerate(reversed(range(levels))):
        width, n, attend = widths[level], shape.num_res_blocks[level], shape.outputs_attend[level]
        for r in range(n + 1):
            last = r == n
            upsample = last and level != 0
            out = f"up_blocks.{j}.{'attentions' if attend else 'resnets'}.{r}"
            aliases = [f"up_blocks.{j}"] if last else []
            blocks.append(_block(f"output_blocks.{k}", width, False,
                                 f"up_blocks.{j}.upsamplers.0" if upsample else out, "output", aliases,
                                 diffusers_input=f"up_blocks.{j}.resnets.{r}"))  # its input: cat(h, skip)
            if attend:
                attentions.append(_attention(f"output_blocks.{k}", width, out))
            k += 1
    return Catalogue(family, tuple(blocks + attentions), compatible=tuple(compatible))
