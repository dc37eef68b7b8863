"""Diffusion transformers whose ComfyUI network offers block replacement: FLUX.1, FLUX.2, Chroma,
HunyuanVideo, AuraFlow, Qwen-Image, SD3/SD3.5, Wan 2.x (T2V, I2V), LTX-Video.

Sites: every block of the family's kinds (:mod:`sae_core.sites.families`), streams "image", "text"
(where the block carries text tokens) and "update" (image tokens' output minus input). ``d`` is the
network's width; text tokens have been projected to it before the first block.

Verified in ComfyUI 0.3.75 (``comfy/ldm/{flux,chroma,hunyuan_video,aura,qwen_image,wan,lightricks}``,
``comfy/ldm/modules/diffusionmodules/mmdit.py``):

* Route: every one of these networks looks up ``transformer_options["patches_replace"]["dit"]`` per
  block, ``("double_block", i)`` or ``("single_block", i)``, and calls ``fn(args, {"original_block":
  block_wrap})`` instead of block i (``ModelPatcher.set_model_patch_replace(fn, "dit", kind, i)``).
  What ``args`` holds and ``fn`` must return, by the block's role in the family:

  - "double" (Flux/Chroma/Hunyuan ``double_blocks``, AuraFlow ``double_layers``, Qwen-Image
    ``transformer_blocks``, SD3 ``joint_blocks``): ``args["img"]``, ``args["txt"]`` (plus vec, pe,
    masks, transformer_options); returns ``{"img", "txt"}``. SD3's last joint block returns
    ``txt`` None (it has no text output, so no "text" site).
  - "image" (Wan ``blocks``, LTX-Video ``transformer_blocks``, all keyed "double_block"):
    ``args["img"]``; ``args["txt"]`` is the cross-attention context, not changed; returns ``{"img"}``.
  - "single" (Flux/Chroma/Hunyuan ``single_blocks``, AuraFlow ``single_layers``): ``args["img"]`` is
    ONE joint sequence of text and image tokens, returned as ``{"img"}`` in the same layout: text
    first (``cat(txt, img)``) except the Hunyuan family (``cat(img, txt)``): ``Family.text_first``.

* Blocks write over their inputs: Flux, Flux 2, Chroma and Hunyuan blocks add to ``img``/``txt`` in
  place (``img += ...``), LTX-Video's to ``x`` (``addcmul_``). So "update" copies the block's input
  before running it, and a site function that keeps the tokens it is given must copy them.
* Chaining: a second patch on the same block finds the first in the clone's ``patches_replace`` and
  calls it in place of ``original_block``: both run, the earlier one first. A site function that
  returns its input unchanged leaves the block's output bit-identical (``edit_tokens``).
* Text length inside a joint sequence: the double blocks' ``txt`` keeps its length to the end, and
  the single blocks run on the last double block's outputs joined. Newer ComfyUI says where the image
  tokens are (``transformer_options["img_slice"] = [start, stop]``); 0.3.75 does not, so each of our
  double-block patches writes the text length of its output into the call's ``transformer_options``
  (one dict per model call, passed to every block) and, when single blocks are patched, a probe that
  only records it is installed on the last double block. Last resort: the conditioning's length
  (:class:`~.common.ModelCall`) plus the tokens the network puts before it (AuraFlow: 8 registers).
  ``post_input`` patches (USO) lengthen ``txt`` inside Flux, which is why the blocks come first.
* Grid: the networks patchify the latent (B, C, H, W), or (B, C, T, H, W) for video (Hunyuan, Wan,
  LTX-Video; Qwen-Image's image latent has T = 1), each axis padded up to a multiple of the patch,
  frame-major then row-major, and put these tokens FIRST in ``img``, except HunyuanVideo, which puts a
  reference latent's tokens before them. Reference latents (Flux Kontext, Qwen-Image edit) are
  appended. The blocks never see the latent: :func:`~.common.note_model_call` (an APPLY_MODEL wrapper)
  notes its shape per call. The "image" and "update" streams are the picture's ``frames x rows x
  cols`` tokens, ``ctx.grid = (rows, cols)``, ``ctx.frames = frames``; without the note the grid is
  None and all image tokens are passed.
* Context: ``transformer_options`` ``"sigmas"``, ``"sample_sigmas"``, ``"cond_or_uncond"``
  (see ``common.py``).

Conditioning site: ``context:text`` (every family here) is the prompt's tokens before the network's own
text projection (``DitNetwork.context``: Flux's ``txt_in``, SD3's ``context_embedder``, AuraFlow's
``cond_seq_linear``, Wan's ``text_embedding``, ...; its input width is the site's width), installed by
``common.ComfyAdapter.apply`` on ``c_crossattn``.

Family rule: the exact network class, and the MODEL's ``comfy.model_base`` class where two families
share one network (:data:`NETWORKS`). Subclasses of these networks (Chroma Radiance, Wan VACE/camera/
S2V/HuMo, ...) and other models on the same class (HunyuanVideo 1.5, HunyuanImage 2.1) are other
models, with other dictionaries: they are not handled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import Tensor, nn

from ...sae_core.errors import SiteError
from ...sae_core.sites import Site, SiteFunction, family
from .common import (Network, NetworkAdapter, add_wrapper, comfy_context, diffusion_model, edit_tokens, note_model_call,
                     noted_call, number, patch_size)

TEXT_TOKENS_KEY = "diffusion_sae_txt_tokens"
"""transformer_options key where our double-block patches note the text length of this model call."""


@dataclass(frozen=True)
class DitNetwork(Network):
    """A network with block replacement, and where its tokens lie."""

    refs_first: bool = False
    """Extra image tokens (a reference latent's) come before the picture's, not after."""
    registers: Callable[[nn.Module], int] = lambda net: 0
    """Tokens the network puts before the prompt's in its text stream."""


NETWORKS: tuple[DitNetwork, ...] = (
    DitNetwork("flux", "comfy.ldm.flux.model", "Flux", number("hidden_size"), base="Flux", not_base=("Flux2",),
               context="txt_in"),
    DitNetwork("flux2", "comfy.ldm.flux.model", "Flux", number("hidden_size"), base="Flux2", context="txt_in"),
    DitNetwork("chroma", "comfy.ldm.chroma.model", "Chroma", number("hidden_size"), context="txt_in"),
    DitNetwork("hunyuan_video", "comfy.ldm.hunyuan_video.model", "HunyuanVideo", number("hidden_size"),
               base="HunyuanVideo", not_base=("HunyuanVideo15",), refs_first=True, context="txt_in"),
    DitNetwork("aura_flow", "comfy.ldm.aura.mmdit", "MMDiT", lambda net: int(net.register_tokens.shape[-1]),
               registers=lambda net: int(net.register_tokens.shape[1]), context="cond_seq_linear"),
    DitNetwork("qwen_image", "comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel", number("inner_dim"),
               context="txt_in"),
    DitNetwork("sd3", "comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper",
               number("hidden_size"), patch=lambda net: patch_size(net.x_embedder.patch_size), base="SD3", context="context_embedder"),
    DitNetwork("wan", "comfy.ldm.wan.model", "WanModel", number("dim"), base="WAN21", context="text_embedding"),
    DitNetwork("ltxv", "comfy.ldm.lightricks.model", "LTXVModel", number("inner_dim"),
               patch=lambda net: patch_size(net.patchifier.patch_size), base="LTXV", context="caption_projection"),
)
"""The families handled here, by their ComfyUI network (checked in order)."""


@dataclass(frozen=True)
class Layout:
    """Where a family's tokens lie in a block's tensors, for one model."""

    patch: tuple[int, int, int]
    text_first: bool
    refs_first: bool
    registers: int

    def picture(self, options: Mapping[str, Any], count: int) -> tuple[int, int, Optional[tuple[int, int]], int]:
        """``(start, stop, grid, frames)`` of the picture's tokens among ``count`` image tokens."""
        call = noted_call(options)
        grid = call.grid(self.patch) if call is not None else None
        if grid is None or not 0 < grid[0] * grid[1] * grid[2] <= count:
            return 0, count, None, 1
        frames, rows, cols = grid
        start = count - frames * rows * cols if self.refs_first else 0
        return start, start + frames * rows * cols, (rows, cols), frames

    def text_tokens(self, options: Mapping[str, Any], total: int, block: str) -> int:
        """How many of a joint sequence's ``total`` tokens are text."""
        image = options.get("img_slice")  # newer ComfyUI: [start, stop] of the image tokens
        if image is not None:
            return total - (int(image[1]) - int(image[0]))
        if options.get(TEXT_TOKENS_KEY) is not None:
            return int(options[TEXT_TOKENS_KEY])
        call = noted_call(options)
        if call is not None and call.context_tokens is not None:
            return call.context_tokens + self.registers
        raise SiteError(f"cannot tell where the image tokens are in {block}: no double block reported the text "
                        "length in this model call (another node may have replaced the last double block "
                        "without calling the original)")


def _options(args: Mapping[str, Any]) -> dict:
    options = args.get("transformer_options")
    return options if isinstance(options, dict) else {}


def _run_previous(previous: Optional[Callable], args: dict, extra: dict) -> dict:
    return previous(args, extra) if previous is not None else extra["original_block"](args)


def _needs_input(entries: list) -> bool:
    return any(site.stream == "update" for site, _ in entries)


def _separate_streams_patch(entries: list, previous: Optional[Callable], layout: Layout) -> Callable:
    """The replacement of a "double" or "image" block: image tokens in ``img``, text (if any) in ``txt``."""
    needs_input = _needs_input(entries)

    def block(args, extra):
        img_in = args["img"].clone() if needs_input else None
        out = _run_previous(previous, args, extra)
        options = _options(args)
        txt = out.get("txt")
        if isinstance(txt, Tensor):
            options[TEXT_TOKENS_KEY] = int(txt.shape[1])
        if not entries:
            return out
        img = out["img"]
        ctx = comfy_context(options, img.shape[0])
        start, stop, grid, frames = layout.picture(options, img.shape[1])
        for site, fn in entries:
            if site.stream == "text":
                txt = edit_tokens(site, fn, txt, 0, txt.shape[1], ctx)
            else:
                before = img_in if site.stream == "update" else None
                img = edit_tokens(site, fn, img, start, stop, ctx.at(grid, frames), before=before)
        out = dict(out)
        out["img"] = img
        if "txt" in out:
            out["txt"] = txt
        return out

    block.diffusion_sae_records_text = True
    return block


def _joint_patch(name: str, entries: list, previous: Optional[Callable], layout: Layout) -> Callable:
    """The replacement of a "single" block: text and image tokens in one sequence ``img``."""
    needs_input = _needs_input(entries)

    def block(args, extra):
        joint_in = args["img"].clone() if needs_input else None
        out = _run_previous(previous, args, extra)
        joint = out["img"]
        options = _options(args)
        total = joint.shape[1]
        text = layout.text_tokens(options, total, name)
        image_at, text_at = (text, 0) if layout.text_first else (0, total - text)
        start, stop, grid, frames = layout.picture(options, total - text)
        ctx = comfy_context(options, joint.shape[0])
        for site, fn in entries:
            if site.stream == "text":
                joint = edit_tokens(site, fn, joint, text_at, text_at + text, ctx)
            else:
                before = joint_in if site.stream == "update" else None
                joint = edit_tokens(site, fn, joint, image_at + start, image_at + stop, ctx.at(grid, frames),
                                    before=before)
        out = dict(out)
        out["img"] = joint
        return out

    return block


def _replace_patches(model_patcher: Any) -> dict:
    options = model_patcher.model_options.get("transformer_options", {})
    return options.get("patches_replace", {}).get("dit", {})


def _patch_key(role: str) -> str:
    return "single_block" if role == "single" else "double_block"


class DitAdapter(NetworkAdapter):
    """Sites on the blocks of the networks in :data:`NETWORKS` (see the module docstring)."""

    name = "dit"
    networks = NETWORKS

    def install(self, model_patcher: Any, plan: Mapping[str, list]) -> Any:
        """A clone of ``model_patcher`` running the plan's site functions (the input is untouched)."""
        spec = self.spec(model_patcher)
        net = diffusion_model(model_patcher)
        kinds = {kind.prefix: kind for kind in family(spec.family).kinds}
        layout = Layout(spec.patch(net), family(spec.family).text_first, spec.refs_first, spec.registers(net))
        clone = model_patcher.clone()
        for block, entries in plan.items():
            prefix, index = block.rsplit(".", 1)
            role = kinds[prefix].role
            previous = _replace_patches(clone).get((_patch_key(role), int(index)))
            if role == "single":
                fn = _joint_patch(block, entries, previous, layout)
            else:
                fn = _separate_streams_patch(entries, previous, layout)
            clone.set_model_patch_replace(fn, "dit", _patch_key(role), int(index))
        doubles = [kind.prefix for kind in kinds.values() if kind.role == "double" and len(getattr(net, kind.prefix))]
        if doubles and any(kinds[block.rsplit(".", 1)[0]].role == "single" for block in plan):
            last = ("double_block", len(getattr(net, doubles[-1])) - 1)
            previous = _replace_patches(clone).get(last)
            if not getattr(previous, "diffusion_sae_records_text", False):
                clone.set_model_patch_replace(_separate_streams_patch([], previous, layout), "dit", *last)
        add_wrapper(clone, note_model_call)
        return clone

