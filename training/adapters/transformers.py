"""Diffusion transformers in diffusers: every family of :mod:`sae_core.sites.families` that diffusers 0.42 has.

Site names are ComfyUI's (``double_blocks.3:image``); the family table also knows diffusers' module
lists, so ``transformer_blocks.3:image`` resolves to the same site. Verified in diffusers 0.42.1,
``models/transformers/``: what each model calls its blocks with, and what they return.

* **flux** ``FluxTransformer2DModel`` (``transformer_flux.py``): ``transformer_blocks[i](hidden_states=image,
  encoder_hidden_states=text, temb, ...)`` returns ``(text, image)``; ``single_transformer_blocks[i]`` takes
  the two streams separately too, runs ``cat(text, image)`` inside and returns them split, ``(text, image)``.
* **flux2** ``Flux2Transformer2DModel`` (``transformer_flux2.py``): double blocks as Flux, ``(text, image)``;
  single blocks are called with the joint sequence ``cat(text, image)`` as ``hidden_states`` (and
  ``encoder_hidden_states=None``) and return that joint tensor: text is its first ``T`` tokens, ``T``
  the length of the model's ``encoder_hidden_states``.
* **chroma** ``ChromaTransformer2DModel`` (``transformer_chroma.py``): as flux2 (double ``(text, image)``,
  single on and returning ``cat(text, image)``).
* **sd3** ``SD3Transformer2DModel`` (``transformer_sd3.py``): ``transformer_blocks[i]`` (JointTransformerBlock)
  ``(hidden_states=image, encoder_hidden_states=text, temb)`` returns ``(text, image)``; the last block is
  ``context_pre_only`` and returns ``(None, image)``, so it has no text site. Blocks named in the call's
  ``skip_layers`` do not run, so their sites do not fire.
* **qwen_image** ``QwenImageTransformer2DModel`` (``transformer_qwenimage.py``): ``transformer_blocks[i]
  (hidden_states=image, encoder_hidden_states=text, encoder_hidden_states_mask, temb, ...)`` returns
  ``(text, image)``.
* **wan** ``WanTransformer3DModel`` (``transformer_wan.py``): ``blocks[i](image, text, temb, rope)``
  (positional) returns the image tokens only; text enters by cross-attention and is never updated.
  Tokens are frames x rows x cols, frame-major, from the latent ``(B, C, F, H, W)`` and ``patch_size``.
* **aura_flow** ``AuraFlowTransformer2DModel`` (``auraflow_transformer_2d.py``): ``joint_transformer_blocks[i]
  (hidden_states=image, encoder_hidden_states=text, temb)`` returns ``(text, image)``;
  ``single_transformer_blocks[i](hidden_states=cat(text, image), temb)`` returns that joint tensor. The
  text stream starts with the model's 8 ``register_tokens`` (as in ComfyUI).
* **hunyuan_video** ``HunyuanVideoTransformer3DModel`` (``transformer_hunyuan_video.py``): both block lists
  are called positionally ``(image, text, temb, attention_mask, rope, ...)`` and return ``(image, text)``:
  IMAGE first; the single blocks join and split the streams inside. Video tokens as wan.
* **ltxv** ``LTXVideoTransformer3DModel`` (``transformer_ltx.py``): ``transformer_blocks[i](hidden_states=
  image, encoder_hidden_states=text, temb, ...)`` returns the image tokens only (text by cross-attention).
  The token grid comes from the call's ``num_frames``, ``height``, ``width`` (latent sizes).
* **lumina2** ``Lumina2TransformerBlock`` lists of ``Lumina2Transformer2DModel`` (``transformer_lumina2.py``):
  ``noise_refiner[i](image, None, rope, temb)`` returns image tokens, ``context_refiner[i](text, mask, rope)``
  text tokens; ``layers[i](joint, mask, rope, temb)`` run on one sequence per row, the row's caption
  tokens first (as many as its ``encoder_attention_mask`` allows), then its image tokens, then zeros up to
  the longest row. Where rows' captions differ in length their image tokens start at different positions:
  the adapter gathers each row's own tokens; the "text" stream is then padded with zeros to the longest
  caption and what a site function writes there is dropped.
* **lumina2 (Z-Image)** ``ZImageTransformer2DModel`` (``transformer_z_image.py``): the same three lists of
  ``ZImageTransformerBlock(x, mask, rope, ...)``. The model takes lists (one latent ``(C, F, H, W)`` and one
  caption per row); image and caption are each padded to a multiple of 32 tokens; ``noise_refiner`` sees
  the padded image tokens (the site is the first ``rows x cols``), ``context_refiner`` the padded captions
  (zeros after a shorter row's caption, as the model pads them); ``layers`` see ``cat(image, text)``,
  IMAGE first (ComfyUI's NextDiT puts the text first; attention with positional RoPE makes the tokens the
  same, so the sites are). Omni mode (nested lists) has no joint-sequence sites here.
* **hidream** ``HiDreamImageTransformer2DModel`` (``transformer_hidream_image.py``): ``double_stream_blocks[i]``
  (a ``HiDreamBlock`` wrapper) ``(hidden_states=image, encoder_hidden_states=text, ...)`` returns
  ``(image, text)``, the text being T5 + the last Llama layer + this block's Llama layer (as in ComfyUI);
  ``single_stream_blocks[i](hidden_states=cat(image, text), ...)`` returns that joint tensor, IMAGE first.
  A non-square latent is padded to ``max_seq`` image tokens: the site is the first ``rows x cols``.

Streams: "image", "text" (the block's output tokens) and "update" (image output minus image input,
SDLens's target), as the family table lists them. Gradient checkpointing calls blocks positionally;
the input is read by keyword or from position 0 either way. ControlNet residuals are added after a block
returns: a site sees the block's own output.

The conditioning site ``context:text`` is the ``encoder_hidden_states`` a model is called with, as wide as
its config says (``ModelLayout.context``: ``joint_attention_dim``, Wan's ``text_dim``, HunyuanVideo's
``text_embed_dim``, LTX-Video's ``caption_channels``, Lumina 2's ``cap_feat_dim``); Z-Image (lists of
captions) and HiDream (T5 and Llama tokens apart) have none.

Sigma: flow models' ``timestep`` input is sigma (flux, flux2, chroma, qwen_image, aura_flow), sigma x 1000
(sd3, wan, hunyuan_video, ltxv, hidream: their pipelines pass the scheduler's timestep), or 1 - sigma
(Lumina 2 and Z-Image count time the other way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from sae_core import SiteError
from sae_core.sites import CONTEXT, Catalogue, Site, first_float, transformer_catalogue

from .base import Adapter, ModelCall, Span, Tap, context_tap

Grid = Optional[tuple[int, int]]
Layout = tuple[Grid, int, dict[str, Span]]
"""What a call says about its tokens: (rows, cols) of one frame, frames, spans of joint sequences."""
Z_IMAGE_PAD = 32
"""Z-Image pads image and caption tokens to a multiple of this many."""


def token_grid(img_ids: Optional[Tensor], tokens: int) -> Grid:
    """(rows, cols) when ``img_ids`` (tokens, 3 or 4: (t, row, col[, layer])) lays ``tokens`` image tokens
    out row-major; else None (e.g. Kontext's or Flux 2's appended reference tokens)."""
    if img_ids is None or tokens == 0:
        return None
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # a batch dimension is deprecated but accepted
    if ids.shape[0] != tokens:
        return None
    pos = ids[:, 1:3].detach().round().long().cpu()
    pos = pos - pos[0]
    cols = int(pos[:, 1].max()) + 1
    if tokens % cols:
        return None
    rows = tokens // cols
    expected = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    return (rows, cols) if torch.equal(pos, expected.reshape(-1, 2)) else None


def in_sequence(*parts: tuple[str, Union[int, Tensor]]) -> dict[str, Span]:
    """Spans of ``(name, length)`` parts laid one after another (a length may differ per row)."""
    spans: dict[str, Span] = {}
    start: Union[int, Tensor] = 0
    for name, length in parts:
        spans[name] = Span(start, length)
        start = start + length
    return spans


def per_row(lengths: Tensor) -> Union[int, Tensor]:
    """An int when every row has the same length (exact slicing), else the (batch,) lengths."""
    lengths = lengths.detach().long().cpu().reshape(-1)
    return int(lengths[0]) if bool((lengths == lengths[0]).all()) else lengths


def _flux(model: nn.Module, a: Mapping[str, Any]) -> Layout:
    image, text = a["hidden_states"], a.get("encoder_hidden_states")
    spans = in_sequence(("text", int(text.shape[1])), ("image", int(image.shape[1]))) if text is not None else {}
    return token_grid(a.get("img_ids"), int(image.shape[1])), 1, spans


def _picture(model: nn.Module, a: Mapping[str, Any]) -> Layout:
    """A latent (B, C, H, W) patchified by ``config.patch_size``, no joint sequence in the model's own call."""
    p = int(model.config.patch_size)
    height, width = a["hidden_states"].shape[-2:]
    return (height // p, width // p), 1, {}


def _aura_flow(model: nn.Module, a: Mapping[str, Any]) -> Layout:
    grid, _, _ = _picture(model, a)
    text = int(a["encoder_hidden_states"].shape[1]) + int(model.register_tokens.shape[1])
    return grid, 1, in_sequence(("text", text), ("image", grid[0] * grid[1]))


def _qwen_image(model: nn.Module, a: Mapping[str, Any]) -> Layout:
    shapes = a.get("img_shapes")
    if not shapes or not shapes[0]:
        return None, 1, {}
    first = shapes[0][0] if isinstance(shapes[0], (list, tuple)) and isinstance(shapes[0][0], (list, tuple)) else shapes[0]
    frames, rows, cols = (int(v) for v in first)
    return (rows, cols), frames, {}


def _video(model: nn.Module, a: Mapping[str, Any]) -> Layout:
    """A latent (B, C, F, H, W); wan's ``patch_size`` is (t, h, w), hunyuan's ``patch_size_t`` + ``patch_size``."""
    config = model.config
    if isinstance(config.patch_size, (list, tuple)):
        pt, ph, pw = (int(v) for v in config.patch_size)
    else:
        pt, ph, pw = int(config.get("patch_size_t", 1)), int(config.patch_size), int(config.patch_size)
    frames, height, width = a["hidden_states"].shape[-3:]
    return (height // ph, width // pw), frames // pt, {}


def _ltxv(model: nn.Module, a: Mapping[str, Any]) -> Layout:
    frames, height, width = a.get("num_frames"), a.get("height"), a.get("width")
    if frames is None or height is None or width is None:
        return None, 1, {}
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    return (int(height) // p, int(width) // p), int(frames) // pt, {}


def _lumina2(model: nn.Module, a: Mapping[str, Any]) -> Layout:
    grid, _, _ = _picture(model, a)
    mask = a.get("encoder_attention_mask")
    text = a["encoder_hidden_states"]
    captions = per_row(mask.sum(dim=1)) if mask is not None else int(text.shape[1])
    return grid, 1, in_sequence(("text", captions), ("image", grid[0] * grid[1]))


def _padded(n: int) -> int:
    return n + (-n) % Z_IMAGE_PAD


def _z_image(model: nn.Module, a: Mapping[str, Any]) -> Layout:
    x = a["x"]
    if isinstance(x[0], (list, tuple)):  # omni mode: condition images and SigLIP tokens in the sequence
        return None, 1, {}
    p, pf = int(a.get("patch_size", 2)), int(a.get("f_patch_size", 1))
    frames, height, width = (int(v) for v in x[0].shape[-3:])
    grid, frames = (height // p, width // p), frames // pf
    image = grid[0] * grid[1] * frames
    captions = per_row(torch.tensor([_padded(len(c)) for c in a["cap_feats"]]))
    return grid, frames, in_sequence(("image", image), ("padding", _padded(image) - image), ("text", captions))


def _hidream(model: nn.Module, a: Mapping[str, Any]) -> Layout:
    hidden = a["hidden_states"]
    if hidden.ndim == 3:  # pre-patchified with masks: the sizes come with the call
        sizes = a.get("img_sizes")
        if sizes is None:
            return None, 1, {}
        rows, cols = (int(v) for v in sizes[0])
        total = int(hidden.shape[1])
    else:
        p = int(model.config.patch_size)
        height, width = hidden.shape[-2:]
        rows, cols = height // p, width // p
        total = rows * cols if height == width else int(model.max_seq)
    llama = int(a["encoder_hidden_states_llama3"].shape[-2])
    text = int(a["encoder_hidden_states_t5"].shape[1]) + 2 * llama
    return (rows, cols), 1, in_sequence(("image", rows * cols), ("padding", total - rows * cols), ("text", text))


def _flow(t: float) -> float:
    return t


def _thousandths(t: float) -> float:
    return t / 1000.0


def _reversed(t: float) -> float:
    return 1.0 - t


TEXT_IMAGE = {"text": 0, "image": 1}
IMAGE_TEXT = {"image": 0, "text": 1}
TENSOR = {"image": None, "text": None}


@dataclass(frozen=True)
class ModelLayout:
    """How one diffusers class runs its family's blocks."""

    family: str
    classes: tuple[str, ...]
    counts: Mapping[str, str]
    """Canonical block prefix -> the config key holding how many blocks of that kind there are."""
    width: tuple[str, ...]
    """Config keys whose product is the token width (heads x head width, or the hidden size)."""
    outputs: Mapping[str, Mapping[str, Optional[int]]]
    """Prefix -> {"image"/"text": position in the block's output tuple, None: the output is the tensor}."""
    call: Callable[[nn.Module, Mapping[str, Any]], Layout]
    sigma: Callable[[float], float]
    parts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Prefix -> the streams whose tensor holds more than the site's tokens (``ModelCall.spans`` say where)."""
    timestep: str = "timestep"
    """Name of the forward argument holding the timestep."""
    batch: Callable[[Mapping[str, Any]], int] = lambda a: int(a["hidden_states"].shape[0])
    context: Optional[str] = "joint_attention_dim"
    """Config key of the width of the text tokens the model is called with (``encoder_hidden_states``), for
    the conditioning site; None where the model takes its text otherwise (lists, several encoders)."""


FLUX_COUNTS = {"double_blocks": "num_layers", "single_blocks": "num_single_layers"}
HEADS = ("num_attention_heads", "attention_head_dim")
JOINT = ("text", "image")

LAYOUTS: tuple[ModelLayout, ...] = (
    ModelLayout("flux", ("FluxTransformer2DModel",), FLUX_COUNTS, HEADS,
                {"double_blocks": TEXT_IMAGE, "single_blocks": TEXT_IMAGE}, _flux, _flow),
    ModelLayout("flux2", ("Flux2Transformer2DModel",), FLUX_COUNTS, HEADS,
                {"double_blocks": TEXT_IMAGE, "single_blocks": TENSOR}, _flux, _flow, {"single_blocks": JOINT}),
    ModelLayout("chroma", ("ChromaTransformer2DModel",), FLUX_COUNTS, HEADS,
                {"double_blocks": TEXT_IMAGE, "single_blocks": TENSOR}, _flux, _flow, {"single_blocks": JOINT}),
    ModelLayout("sd3", ("SD3Transformer2DModel",), {"joint_blocks": "num_layers"}, HEADS,
                {"joint_blocks": TEXT_IMAGE}, _picture, _thousandths),
    ModelLayout("qwen_image", ("QwenImageTransformer2DModel",), {"transformer_blocks": "num_layers"}, HEADS,
                {"transformer_blocks": TEXT_IMAGE}, _qwen_image, _flow),
    ModelLayout("wan", ("WanTransformer3DModel",), {"blocks": "num_layers"}, HEADS, {"blocks": TENSOR}, _video,
                _thousandths, context="text_dim"),
    ModelLayout("aura_flow", ("AuraFlowTransformer2DModel",),
                {"double_layers": "num_mmdit_layers", "single_layers": "num_single_dit_layers"}, HEADS,
                {"double_layers": TEXT_IMAGE, "single_layers": TENSOR}, _aura_flow, _flow, {"single_layers": JOINT}),
    ModelLayout("hunyuan_video", ("HunyuanVideoTransformer3DModel",), FLUX_COUNTS, HEADS,
                {"double_blocks": IMAGE_TEXT, "single_blocks": IMAGE_TEXT}, _video, _thousandths,
                context="text_embed_dim"),
    ModelLayout("ltxv", ("LTXVideoTransformer3DModel",), {"transformer_blocks": "num_layers"}, HEADS,
                {"transformer_blocks": TENSOR}, _ltxv, _thousandths, context="caption_channels"),
    ModelLayout("lumina2", ("Lumina2Transformer2DModel",),
                {"noise_refiner": "num_refiner_layers", "context_refiner": "num_refiner_layers", "layers": "num_layers"},
                ("hidden_size",), {"noise_refiner": TENSOR, "context_refiner": TENSOR, "layers": TENSOR},
                _lumina2, _reversed, {"layers": JOINT}, context="cap_feat_dim"),
    ModelLayout("lumina2", ("ZImageTransformer2DModel",),
                {"noise_refiner": "n_refiner_layers", "context_refiner": "n_refiner_layers", "layers": "n_layers"},
                ("dim",), {"noise_refiner": TENSOR, "context_refiner": TENSOR, "layers": TENSOR},
                _z_image, _reversed, {"noise_refiner": ("image",), "layers": JOINT}, timestep="t",
                batch=lambda a: len(a["x"]), context=None),
    ModelLayout("hidream", ("HiDreamImageTransformer2DModel",),
                {"double_stream_blocks": "num_layers", "single_stream_blocks": "num_single_layers"}, HEADS,
                {"double_stream_blocks": IMAGE_TEXT, "single_stream_blocks": TENSOR}, _hidream, _thousandths,
                {"double_stream_blocks": ("image",), "single_stream_blocks": JOINT}, timestep="timesteps",
                context=None),
)


class TransformerAdapter(Adapter):
    """Every diffusion transformer of :data:`LAYOUTS`: catalogue from the config, taps from the layout."""

    model_classes = tuple(name for layout in LAYOUTS for name in layout.classes)

    def layout(self, model: nn.Module) -> ModelLayout:
        names = {cls.__name__ for cls in type(model).__mro__}
        for layout in LAYOUTS:
            if names & set(layout.classes):
                return layout
        raise SiteError(f"{type(model).__name__} is not a diffusion transformer this adapter knows; known: "
                        + ", ".join(self.model_classes))

    def catalogue(self, model: nn.Module) -> Catalogue:
        layout, config = self.layout(model), model.config
        counts = {prefix: int(config[key]) for prefix, key in layout.counts.items()}
        context = int(config[layout.context]) if layout.context else None
        return transformer_catalogue(layout.family, counts, math.prod(int(config[key]) for key in layout.width),
                                     context_width=context)

    def tap(self, model: nn.Module, site: Site) -> Tap:
        layout = self.layout(model)
        if site.block == CONTEXT:
            return context_tap(model)
        prefix = site.block.rsplit(".", 1)[0]
        kind = "text" if site.stream == "text" else "image"
        part = kind if kind in layout.parts.get(prefix, ()) else None
        return Tap(self.module(model, site), layout.outputs[prefix][kind], kind, update=site.stream == "update",
                   part=part)

    def model_call(self, model: nn.Module, arguments: Mapping[str, Any]) -> ModelCall:
        layout = self.layout(model)
        timestep = first_float(arguments.get(layout.timestep))
        grid, frames, spans = layout.call(model, arguments)
        return ModelCall(batch=layout.batch(arguments), timestep=timestep,
                         sigma=None if timestep is None else layout.sigma(timestep), grid=grid, frames=frames,
                         spans=spans)
