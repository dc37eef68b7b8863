"""Diffusion transformers whose ComfyUI network gives no block patch point (0.3.75): Lumina 2 and Z-Image
(``comfy.ldm.lumina.model.NextDiT``), HiDream-I1 (``comfy.ldm.hidream.model``).

Route: PyTorch forward hooks on the block modules, installed only while the patched clone's model
runs. ComfyUI has no hook that belongs to a clone (the network is shared by every clone of a MODEL),
so ``patch`` registers a ``WrappersMP.APPLY_MODEL`` wrapper on the clone; for each model call it
registers the hooks on the network's blocks, calls the model, and removes them in ``finally``. The
shared network therefore never keeps a hook: another clone, or the unpatched MODEL, runs untouched,
and an error in a site function still takes the hooks off. A block's forward hook returns the edited
output; when "update" is asked a forward pre-hook first copies the block's input.

What each block's forward receives and returns (verified in ComfyUI 0.3.75):

* Lumina 2 / Z-Image (``lumina/model.py``, ``NextDiT.patchify_and_embed`` and ``_forward``): every
  block is a ``JointTransformerBlock(x, x_mask, freqs_cis, adaln_input)`` returning the new ``x``
  (``x = x + ...``, not in place).
  - ``noise_refiner.{i}``: ``x`` = the picture's tokens, row-major over the latent padded to the patch
    size; Z-Image (``pad_tokens_multiple`` 32) appends learned pad tokens up to a multiple of 32.
    Streams "image", "update".
  - ``context_refiner.{i}``: ``x`` = the prompt's tokens (Z-Image: plus pad tokens to a multiple of
    32). Stream "text": the prompt's own tokens.
  - ``layers.{i}``: ``x = cat(text, image)``, text FIRST, each part padded as above. "text": the
    prompt's tokens; "image"/"update": the picture's tokens, after the padded text.
* HiDream (``hidream/model.py``): ``HiDreamImageBlock(image_tokens=..., image_tokens_masks=...,
  text_tokens=..., adaln_input=..., rope=...)``, called with keywords only.
  - ``double_stream_blocks.{i}``: returns ``(image_tokens, text_tokens)``; the text tokens are the
    T5 and last Llama layer's tokens followed by block i's own Llama layer, all updated (the network
    keeps only the first two parts for the next block). Streams "image", "text", "update".
  - ``single_stream_blocks.{i}``: ``image_tokens`` is ONE sequence ``cat(image, text)``, image FIRST;
    returns it (updated, same layout). "image"/"update": the first ``rows x cols`` tokens; "text":
    the rest.
  An edit model's ``image_cond`` (HiDream-E1) is joined to the latent along its width before
  patchifying: the grid then spans the picture and the condition side by side.

Blocks are found by name at every call (``diffusion_model.get_submodule``), so object patches that
replace a block are hooked as the model runs them. Chaining: each patch adds its own wrapper; the
earlier clone's wrapper is outer, registers its hooks first, and its hooks run first.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import Tensor, nn

from ...sae_core.errors import SiteError
from ...sae_core.sites import Site, SiteFunction
from .common import (CALL_KEY, ModelCall, Network, NetworkAdapter, add_wrapper, call_options, comfy_context,
                     edit_tokens, model_call, number)


@dataclass(frozen=True)
class Tokens:
    """Where one model call's tokens lie, for the spans of every block kind."""

    picture: int
    """The picture's tokens (frames x rows x cols)."""
    prompt: Optional[int]
    """The prompt's tokens (the conditioning's length); None if unknown."""
    pad_to: int
    """Z-Image pads text and image parts to a multiple of this (1: no padding)."""

    def padded(self, count: int) -> int:
        return math.ceil(count / self.pad_to) * self.pad_to


Span = tuple[int, int, int]
"""(index of the block output's tensor, first token, end token)."""


def _image_only(tokens: Tokens, parts: list[Tensor]) -> dict[str, Span]:
    return {"image": (0, 0, tokens.picture), "update": (0, 0, tokens.picture)}


def _text_only(tokens: Tokens, parts: list[Tensor]) -> dict[str, Span]:
    return {"text": (0, 0, min(tokens.prompt or parts[0].shape[1], parts[0].shape[1]))}


def _text_then_image(tokens: Tokens, parts: list[Tensor]) -> dict[str, Span]:
    image_at = parts[0].shape[1] - tokens.padded(tokens.picture)
    image = (0, image_at, image_at + tokens.picture)
    return {"text": (0, 0, min(tokens.prompt or image_at, image_at)), "image": image, "update": image}


def _image_and_text(tokens: Tokens, parts: list[Tensor]) -> dict[str, Span]:
    return {**_image_only(tokens, parts), "text": (1, 0, parts[1].shape[1])}


def _image_then_text(tokens: Tokens, parts: list[Tensor]) -> dict[str, Span]:
    return {**_image_only(tokens, parts), "text": (0, tokens.picture, parts[0].shape[1])}


@dataclass(frozen=True)
class HookKind:
    """A kind of block: how to read its input and where its streams are in its output."""

    image_input: str
    """The block's argument holding the image tokens (first positional, or this keyword)."""
    spans: Callable[[Tokens, list[Tensor]], dict[str, Span]]
    """Stream -> where it is in the block's output (a tensor, or a tuple of them)."""

    def input_of(self, args: tuple, kwargs: Mapping[str, Any]) -> Tensor:
        return args[0] if args else kwargs[self.image_input]


def _no_canvas(call: ModelCall) -> tuple[int, ...]:
    return call.shape


def _beside_image_cond(call: ModelCall) -> tuple[int, ...]:
    """HiDream-E1 joins ``image_cond`` to the latent along its width before patchifying."""
    cond = call.inputs.get("image_cond")
    return call.shape if cond is None else (*call.shape[:-1], call.shape[-1] + cond[-1])


@dataclass(frozen=True)
class HookNetwork(Network):
    """A network whose blocks are hooked, with its block kinds by module list."""

    kinds: Mapping[str, HookKind] = field(default_factory=dict)
    canvas: Callable[[ModelCall], tuple[int, ...]] = _no_canvas
    """The shape the network patchifies, from what the model was called with."""


NETWORKS: tuple[HookNetwork, ...] = (
    HookNetwork("lumina2", "comfy.ldm.lumina.model", "NextDiT", number("dim"), base="Lumina2",
                context="cap_embedder", kinds={
                    "noise_refiner": HookKind("x", _image_only),
                    "context_refiner": HookKind("x", _text_only),
                    "layers": HookKind("x", _text_then_image)}),
    HookNetwork("hidream", "comfy.ldm.hidream.model", "HiDreamImageTransformer2DModel", number("inner_dim"),
                canvas=_beside_image_cond, kinds={
                    "double_stream_blocks": HookKind("image_tokens", _image_and_text),
                    "single_stream_blocks": HookKind("image_tokens", _image_then_text)}),
)
"""The families handled here, by their ComfyUI network."""


def _hooks(module: nn.Module, kind: HookKind, entries: list, tokens: Tokens, grid: tuple[int, int], frames: int,
           options: Optional[Mapping[str, Any]]) -> list:
    """Register the hooks running ``entries`` on ``module`` for one model call; returns their handles."""
    handles = []
    kept: dict[str, Tensor] = {}
    if any(site.stream == "update" for site, _ in entries):
        def keep_input(block, args, kwargs):
            kept["input"] = kind.input_of(args, kwargs).clone()  # before the block, whatever it does in place

        handles.append(module.register_forward_pre_hook(keep_input, with_kwargs=True))

    def run_sites(block, args, kwargs, output):
        parts = list(output) if isinstance(output, tuple) else [output]
        spans = kind.spans(tokens, parts)
        ctx = comfy_context(options, parts[0].shape[0])
        for site, fn in entries:
            index, start, stop = spans[site.stream]
            before = kept.get("input") if site.stream == "update" else None
            where = ctx if site.stream == "text" else ctx.at(grid, frames)
            parts[index] = edit_tokens(site, fn, parts[index], start, stop, where, before=before)
        return tuple(parts) if isinstance(output, tuple) else parts[0]

    handles.append(module.register_forward_hook(run_sites, with_kwargs=True))
    return handles


def _hooking_wrapper(spec: HookNetwork, plan: Mapping[str, list]) -> Callable:
    """The APPLY_MODEL wrapper that hooks the planned blocks for one model call and always unhooks them."""

    def hook_blocks(executor, *args, **kwargs):
        model = executor.class_obj
        net = model.diffusion_model
        call = model_call(args, kwargs, model)
        options = call_options(args, kwargs)
        if options is not None:
            options[CALL_KEY] = call
        grid = dataclasses.replace(call, shape=spec.canvas(call)).grid(spec.patch(net))
        if grid is None:
            raise SiteError(f"{spec.family}: the model was called with a latent of shape {call.shape}, "
                            "neither an image nor a video")
        frames, rows, cols = grid
        tokens = Tokens(frames * rows * cols, call.context_tokens, int(getattr(net, "pad_tokens_multiple", None) or 1))
        handles = []
        try:
            for block, entries in plan.items():
                kind = spec.kinds[block.rsplit(".", 1)[0]]
                handles += _hooks(net.get_submodule(block), kind, entries, tokens, (rows, cols), frames, options)
            return executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    return hook_blocks


class HookAdapter(NetworkAdapter):
    """Sites on the blocks of the networks in :data:`NETWORKS`, by hooks that live for one model call."""

    name = "hooks"
    networks = NETWORKS

    def install(self, model_patcher: Any, plan: Mapping[str, list]) -> Any:
        """A clone of ``model_patcher`` that hooks the plan's site functions in while it runs (the input is
        untouched)."""
        spec = self.spec(model_patcher)
        clone = model_patcher.clone()
        if not add_wrapper(clone, _hooking_wrapper(spec, plan)):
            raise SiteError(f"this ComfyUI has no model wrappers (WrappersMP.APPLY_MODEL), which {spec.family} "
                            "sites need: update ComfyUI")
        return clone
