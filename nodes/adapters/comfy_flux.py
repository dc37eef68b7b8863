"""Flux in ComfyUI (``comfy.ldm.flux.model.Flux``): sites on the double and single blocks.

Sites (names as in the diffusers adapter, so dictionaries move between the two; ``d`` = hidden_size):
``double_blocks.{i}``: "image", "text", "update"; ``single_blocks.{i}``: "image", "update".
"update" is the image tokens' block output minus block input (SDLens's target).

Verified in ComfyUI 0.3.75, ``comfy/ldm/flux/model.py`` (``Flux.forward_orig``):

* Route: ``ModelPatcher.set_model_patch_replace(fn, "dit", "double_block", i)`` (or ``"single_block"``).
  The model then calls ``fn(args, {"original_block": block_wrap})``. Double blocks: ``args`` = img, txt,
  vec, pe, attn_mask, transformer_options; ``block_wrap(args)`` returns ``{"img", "txt"}`` and so must
  ``fn``. Single blocks: ``args["img"]`` is ``cat(txt, img)`` (text FIRST, image tokens the tail) and
  ``fn`` returns ``{"img"}`` of the same layout. (``set_model_double_block_patch`` is not read by Flux.)
* Both block kinds add to their input tensors IN PLACE (``img += ...`` in ``flux/layers.py``) and return
  them: the "update" stream copies the block input before running the block, and a site function
  that keeps the tokens it is given must copy them (the next block will overwrite them).
* Chaining: a second patch on the same block finds the first in the clone's ``patches_replace`` and
  calls it in place of ``original_block``: both run, the earlier one first. A probe or our own patch
  on another block is unaffected.
* Text length in single blocks: the double blocks' ``txt`` keeps its length to the end, and the single
  blocks run on ``cat(txt, img)`` of the last double block's outputs. Newer ComfyUI says it outright
  (``transformer_options["img_slice"] = [txt_len, total]``); 0.3.75 does not, so each of our double-block
  patches writes the text length of its output into the call's ``transformer_options`` (one dict per
  model call, passed to every block) and, when single blocks are patched, a probe that only records it
  is installed on the last double block. Last resort: the ``context`` the diffusion model was called
  with. ``post_input`` patches (USO) lengthen ``txt`` inside the model, which is why the text length is
  taken from the blocks, not from the conditioning.
* Grid: ``Flux._forward`` patchifies the latent ``x`` (B, C, H, W) with ``patch_size`` p (padding to a
  multiple) into ``rows = (H + p // 2) // p`` by ``cols = (W + p // 2) // p`` tokens, row-major, and puts
  them FIRST in ``img``; Kontext's reference latents (``ref_latents``) are appended after them. The
  blocks never see ``x``, so a ``WrappersMP.DIFFUSION_MODEL`` wrapper (``Flux.forward`` runs those) notes
  each call's latent shape on a per-thread stack for the blocks to read. The "image" and "update"
  streams are the first ``rows * cols`` tokens (the picture being generated; reference tokens are not
  part of the site) and ``ctx.grid = (rows, cols)``. Without the wrapper's note the grid is None and
  all image tokens are passed.
* Context: ``transformer_options`` ``"sigmas"``, ``"sample_sigmas"``, ``"cond_or_uncond"``
  (see ``common.py``).

Family: "flux" for a ``comfy.ldm.flux.model.Flux`` diffusion model (FLUX.1 dev/schnell/fill/Kontext and
fine-tunes). Flux 2 uses the same class in 0.3.75 but is another model (``model_base.Flux2``, four rope
axes, global modulation) and is not supported; Chroma has its own class.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from ...sae_core.errors import DictionaryError
from ...sae_core.intervention import SiteFunction
from ...sae_core.site import Site
from .common import PATCH_KEY, CallInfo, ComfyAdapter, diffusion_model, edit_tokens, sites, unsupported

DOUBLE, SINGLE = "double_blocks", "single_blocks"
DOUBLE_STREAMS = ("image", "text", "update")
SINGLE_STREAMS = ("image", "update")
TEXT_TOKENS_KEY = "diffusion_sae_txt_tokens"
"""transformer_options key where our double-block patches note the text length of this model call."""

_calls = threading.local()


class _LatentCall:
    """What the DIFFUSION_MODEL wrapper saw of one model call."""

    __slots__ = ("shape", "context_tokens", "text_tokens")

    def __init__(self, shape: tuple[int, ...], context_tokens: Optional[int]):
        self.shape = shape
        self.context_tokens = context_tokens
        self.text_tokens: Optional[int] = None


def _stack() -> list:
    stack = getattr(_calls, "stack", None)
    if stack is None:
        stack = _calls.stack = []
    return stack


def _current_call() -> Optional[_LatentCall]:
    stack = _stack()
    return stack[-1] if stack else None


def latent_shape_wrapper(executor, *args, **kwargs):
    """``WrappersMP.DIFFUSION_MODEL`` wrapper: note the latent shape (and context length) of the call."""
    x = args[0] if args else kwargs.get("x")
    context = args[2] if len(args) > 2 else kwargs.get("context")
    context_tokens = int(context.shape[1]) if isinstance(context, Tensor) and context.ndim == 3 else None
    shape = tuple(x.shape) if isinstance(x, Tensor) else ()
    stack = _stack()
    stack.append(_LatentCall(shape, context_tokens))
    try:
        return executor(*args, **kwargs)
    finally:
        stack.pop()


def _image_tokens(count: int, patch_size: int) -> tuple[int, Optional[tuple[int, int]]]:
    """``(n, grid)``: how many leading image tokens are the generated picture, and their (rows, cols)."""
    call = _current_call()
    if call is not None and len(call.shape) == 4:
        h, w = call.shape[-2:]
        rows, cols = (h + patch_size // 2) // patch_size, (w + patch_size // 2) // patch_size
        if 0 < rows * cols <= count:
            return rows * cols, (rows, cols)
    return count, None


def _remember_text_tokens(args: Mapping[str, Any], n: int) -> None:
    options = args.get("transformer_options")
    if isinstance(options, dict):
        options[TEXT_TOKENS_KEY] = n
    call = _current_call()
    if call is not None:
        call.text_tokens = n


def _text_tokens(args: Mapping[str, Any], index: int) -> int:
    """Leading text tokens of a single block's ``cat(txt, img)`` in this call."""
    options = args.get("transformer_options") or {}
    img_slice = options.get("img_slice")  # newer ComfyUI: [txt_len, total]
    if img_slice is not None:
        return int(img_slice[0])
    if options.get(TEXT_TOKENS_KEY) is not None:
        return int(options[TEXT_TOKENS_KEY])
    call = _current_call()
    if call is not None and call.text_tokens is not None:
        return call.text_tokens
    if call is not None and call.context_tokens is not None:
        return call.context_tokens
    raise DictionaryError(f"cannot tell where the image tokens start in single block {index}: no double block "
                          "reported the text length in this model call (another node may have replaced the "
                          "last double block without calling the original)")


def _run_previous(previous: Optional[Callable], args: dict, extra: dict) -> dict:
    return previous(args, extra) if previous is not None else extra["original_block"](args)


def _double_block_patch(entries: list, previous: Optional[Callable], patch_size: int) -> Callable:
    # The block adds to its input in place (``img += ...`` in DoubleStreamBlock): keep a copy for "update".
    needs_input = any(site.stream == "update" for site, _ in entries)

    def double_block(args, extra):
        img_in = args["img"].clone() if needs_input else None
        out = _run_previous(previous, args, extra)
        img, txt = out["img"], out["txt"]
        _remember_text_tokens(args, txt.shape[1])
        if not entries:
            return out
        info = CallInfo(args.get("transformer_options"), img.shape[0])
        n, grid = _image_tokens(img.shape[1], patch_size)
        for site, fn in entries:
            if site.stream == "text":
                txt = edit_tokens(site, fn, txt, 0, txt.shape[1], info.context(None))
            else:
                before = img_in if site.stream == "update" else None
                img = edit_tokens(site, fn, img, 0, n, info.context(grid), before=before)
        out = dict(out)
        out["img"], out["txt"] = img, txt
        return out

    double_block.diffusion_sae_records_text = True
    return double_block


def _single_block_patch(index: int, entries: list, previous: Optional[Callable], patch_size: int) -> Callable:
    needs_input = any(site.stream == "update" for site, _ in entries)  # SingleStreamBlock: ``x += ...``

    def single_block(args, extra):
        joint_in = args["img"].clone() if needs_input else None
        out = _run_previous(previous, args, extra)
        joint = out["img"]
        start = _text_tokens(args, index)
        n, grid = _image_tokens(joint.shape[1] - start, patch_size)
        ctx = CallInfo(args.get("transformer_options"), joint.shape[0]).context(grid)
        for site, fn in entries:
            before = joint_in if site.stream == "update" else None
            joint = edit_tokens(site, fn, joint, start, start + n, ctx, before=before)
        out = dict(out)
        out["img"] = joint
        return out

    return single_block


def _replace_patches(model_patcher: Any) -> dict:
    options = model_patcher.model_options.get("transformer_options", {})
    return options.get("patches_replace", {}).get("dit", {})


def is_flux(model_patcher: Any) -> bool:
    """A FLUX.1-style ``comfy.ldm.flux.model.Flux`` (not Flux 2, not a subclass such as Chroma's)."""
    try:
        import comfy.ldm.flux.model as flux_model
    except ImportError:
        return False
    net = diffusion_model(model_patcher)
    if type(net) is not flux_model.Flux:
        return False
    return not is_flux2(model_patcher)


def is_flux2(model_patcher: Any) -> bool:
    import comfy.model_base

    flux2 = getattr(comfy.model_base, "Flux2", None)
    if flux2 is not None and isinstance(model_patcher.model, flux2):
        return True
    params = getattr(diffusion_model(model_patcher), "params", None)
    return bool(getattr(params, "global_modulation", False)) or len(getattr(params, "axes_dim", ())) == 4


class FluxAdapter(ComfyAdapter):
    """Sites on ComfyUI's Flux double and single blocks (see the module docstring)."""

    name = "flux"

    def handles(self, model_patcher: Any) -> bool:
        return is_flux(model_patcher)

    def family(self, model_patcher: Any) -> str:
        if not is_flux(model_patcher):
            raise unsupported(diffusion_model(model_patcher), ", not FLUX.1")
        return "flux"

    def available_sites(self, model_patcher: Any) -> list[Site]:
        net = diffusion_model(model_patcher)
        d = int(net.hidden_size)
        names = []
        for i in range(len(net.double_blocks)):
            names += [(f"{DOUBLE}.{i}", stream, d) for stream in DOUBLE_STREAMS]
        for i in range(len(net.single_blocks)):
            names += [(f"{SINGLE}.{i}", stream, d) for stream in SINGLE_STREAMS]
        return sites(self.family(model_patcher), names)

    def patch(self, model_patcher: Any, site_functions: Mapping[Site, SiteFunction]) -> Any:
        """A clone of ``model_patcher`` running ``site_functions`` at their sites (the input is untouched)."""
        plan = self.plan(model_patcher, site_functions)
        net = diffusion_model(model_patcher)
        patch_size = int(getattr(net, "patch_size", 2))
        clone = model_patcher.clone()
        for block, entries in plan.items():
            kind, index = block.split(".")
            index = int(index)
            key = ("double_block" if kind == DOUBLE else "single_block", index)
            previous = _replace_patches(clone).get(key)
            if kind == DOUBLE:
                fn = _double_block_patch(entries, previous, patch_size)
            else:
                fn = _single_block_patch(index, entries, previous, patch_size)
            clone.set_model_patch_replace(fn, "dit", key[0], index)
        if any(block.startswith(SINGLE) for block in plan) and len(net.double_blocks):
            last = ("double_block", len(net.double_blocks) - 1)
            previous = _replace_patches(clone).get(last)
            if not getattr(previous, "diffusion_sae_records_text", False):
                clone.set_model_patch_replace(_double_block_patch([], previous, patch_size), "dit", *last)
        _add_wrapper_once(clone)
        return clone


def _add_wrapper_once(clone: Any) -> None:
    try:
        import comfy.patcher_extension
    except ImportError:
        return
    wrappers = getattr(comfy.patcher_extension, "WrappersMP", None)
    kind = getattr(wrappers, "DIFFUSION_MODEL", None)
    if kind is None or not hasattr(clone, "add_wrapper_with_key"):
        return  # an older ComfyUI: the grid stays unknown (None)
    if latent_shape_wrapper not in clone.get_wrappers(kind, PATCH_KEY):
        clone.add_wrapper_with_key(kind, PATCH_KEY, latent_shape_wrapper)
