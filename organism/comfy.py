"""The model organism as ordinary ComfyUI models, in ComfyUI's OWN classes: what the plugin's organism
nodes (nodes/organism_nodes.py) run. ComfyUI is imported inside the functions, never at import time,
and diffusers not at all: the plugin gets by without it.

A saved organism is a diffusers folder (``save_pretrained``): ``transformer/`` (``FluxTransformer2DModel``)
or ``unet/`` (``UNet2DConditionModel``), each with ``config.json`` and
``diffusion_pytorch_model.safetensors``. :func:`load_organism` converts it to ComfyUI's key layout and
builds ``comfy.ldm.flux.model.Flux`` (through a ``comfy.supported_models.Flux`` subclass) or the
openaimodel ``UNetModel`` (through a ``comfy.supported_models.SD15`` subclass) from an explicit
unet_config (no state-dict detection: it would guess a 128-wide Flux's head count wrong), so Capture,
Steer and Record work on it unchanged.

Conversion (exact; checked against diffusers in tests/test_organism_comfy.py):

* Flux: the key map is ``comfy.utils.flux_to_diffusers``; ``to_q/to_k/to_v`` (and ``add_*_proj``) are
  concatenated into ``img_attn.qkv`` / ``txt_attn.qkv``, single blocks' ``to_q/to_k/to_v/proj_mlp``
  into ``linear1``; ``norm_out.linear`` gets ``swap_scale_shift`` (diffusers: scale, shift; ComfyUI:
  shift, scale). diffusers packs the (4, 16, 16) latent into 2x2 patches outside the model
  (``patch_size=1``, ``in_channels=16``); ComfyUI's Flux does it inside (``patch_size=2``,
  ``in_channels=4``), with the same row-major layout and the same rope ids.
* U-Net: the key map is ``comfy.utils.unet_to_diffusers`` for the unet_config built from config.json.
* Strict: a diffusers key the map does not know, a ComfyUI key nothing fills, a gap in a concatenation
  or a shape that does not fit is an OrganismError naming the keys.

Sampling: Flux is rectified flow with sigma == t (no shift): ``model_base.Flux`` with
``ModelType.FLOW`` and ``sampling_settings = {"shift": 1.0, "multiplier": 1.0}``, i.e.
``ModelSamplingDiscreteFlow``, as FLUX.1-schnell (``ModelSamplingFlux``'s ``shift`` is an exponent:
``shift=1.0`` there would NOT be the identity). The network gets ``timesteps = sigma`` (diffusers'
transformer also gets sigma and multiplies by 1000 inside, as ComfyUI's ``time_factor`` does). The
U-Net is SD1.5's discrete schedule (ComfyUI's "linear" is diffusers' "scaled_linear", betas
0.00085..0.012 over 1000 steps) rescaled to zero terminal SNR (``zsnr``), with v-prediction. The latent format has 4 channels, scale 1 and
shift 0: the latent IS the image, ``pixel_unshuffle(2)`` of the 32x32 picture in [-1, 1].

U-Net block names: the organism's diffusers names (``up_blocks.1``, ...) are accepted by the U-Net
adapter and mean the ComfyUI block with the same output (the U-Net catalogue, ``sae_core.sites.unet``;
for this organism ``up_blocks.1`` = ``output_blocks.3``), checked by value in the tests.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from . import WEIGHTS
from .errors import OrganismError
from .models import LATENT_CHANNELS, LATENT_SIZE, from_latent, to_latent
from .text import shared_encoder

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
"""What a relative organism folder is relative to: the repository (the plugin's folder in ComfyUI)."""
FAMILIES = ("flux", "unet")
SUBFOLDERS = {"flux": "transformer", "unet": "unet"}
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"

SD15_BETAS = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
"""SD1.5's schedule as ComfyUI spells it ("linear" is sqrt-spaced, i.e. diffusers' "scaled_linear")."""

_MAX_NAMED_KEYS = 12


# ----------------------------------------------------------------------------- ComfyUI classes


@functools.lru_cache(maxsize=None)
def comfy_classes() -> SimpleNamespace:
    """``OrganismLatentFormat``, ``OrganismFlux``, ``OrganismSD15`` (built on first use: ComfyUI is imported
    here, not when the plugin is)."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    class OrganismLatentFormat(comfy.latent_formats.LatentFormat):
        """The organism's exact "VAE": 4 channels, scale 1, shift 0; previews average the 2x2 pixels."""

        latent_channels = LATENT_CHANNELS
        latent_dimensions = 2
        scale_factor = 1.0
        shift_factor = 0.0

        def __init__(self):
            self.latent_rgb_factors = [[0.25, 0.25, 0.25] for _ in range(LATENT_CHANNELS)]
            self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]

        def process_in(self, latent):
            return (latent - self.shift_factor) * self.scale_factor

        def process_out(self, latent):
            return latent / self.scale_factor + self.shift_factor

    class OrganismFlux(comfy.supported_models.Flux):
        """The Flux organism: rectified flow, sigma == t (schnell-style ``ModelType.FLOW``, shift 1)."""

        organism_family = "flux"
        unet_config = {"image_model": "flux", "guidance_embed": False}
        sampling_settings = {"shift": 1.0, "multiplier": 1.0}
        unet_extra_config = {}
        latent_format = OrganismLatentFormat
        supported_inference_dtypes = [torch.float32]

        def get_model(self, state_dict, prefix="", device=None):
            return comfy.model_base.Flux(self, model_type=comfy.model_base.ModelType.FLOW, device=device)

    class OrganismSD15(comfy.supported_models.SD15):
        """The U-Net organism: SD1.5's betas at zero terminal SNR, v-prediction, 4 heads from config.json."""

        organism_family = "unet"
        unet_extra_config = {}  # SD15's would force 8 heads; ours come from config.json
        sampling_settings = dict(SD15_BETAS, zsnr=True)

        def model_type(self, state_dict, prefix=""):
            return comfy.model_base.ModelType.V_PREDICTION
        latent_format = OrganismLatentFormat
        supported_inference_dtypes = [torch.float32]

    return SimpleNamespace(OrganismLatentFormat=OrganismLatentFormat, OrganismFlux=OrganismFlux,
                           OrganismSD15=OrganismSD15)


# ----------------------------------------------------------------------------- configs


def _need(config: Mapping[str, Any], key: str, where: Path):
    if key not in config:
        raise OrganismError(f"{where} has no {key!r}: save the organism with diffusers' save_pretrained")
    return config[key]


def flux_unet_config(config: Mapping[str, Any], where: Path = Path(CONFIG_FILE)) -> dict:
    """ComfyUI ``Flux`` unet_config for a diffusers ``FluxTransformer2DModel`` config.json."""
    if _need(config, "patch_size", where) != 1:
        raise OrganismError(f"{where}: patch_size {config['patch_size']} is not supported (the organism packs "
                            f"2x2 latent patches outside the transformer, patch_size 1)")
    in_channels = int(_need(config, "in_channels", where))
    out_channels = int(config.get("out_channels") or in_channels)
    if in_channels != 4 * LATENT_CHANNELS or out_channels != in_channels:
        raise OrganismError(f"{where}: in/out channels {in_channels}/{out_channels}; the organism's are "
                            f"{4 * LATENT_CHANNELS} ({LATENT_CHANNELS} latent channels x 2x2 patches)")
    heads = int(_need(config, "num_attention_heads", where))
    return dict(
        image_model="flux", in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=2,
        vec_in_dim=int(_need(config, "pooled_projection_dim", where)),
        context_in_dim=int(_need(config, "joint_attention_dim", where)),
        hidden_size=heads * int(_need(config, "attention_head_dim", where)), mlp_ratio=4.0, num_heads=heads,
        depth=int(_need(config, "num_layers", where)), depth_single_blocks=int(_need(config, "num_single_layers", where)),
        axes_dim=[int(a) for a in _need(config, "axes_dims_rope", where)], theta=10000, qkv_bias=True,
        guidance_embed=bool(config.get("guidance_embeds", False)),
    )


_UNET_FIXED = {
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32, "norm_eps": 1e-5,
    "downsample_padding": 1, "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
    "encoder_hid_dim": None, "time_cond_proj_dim": None, "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default", "only_cross_attention": False, "dual_cross_attention": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "num_class_embeds": None, "attention_type": "default", "mid_block_scale_factor": 1,
    "resnet_out_scale_factor": 1.0, "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "resnet_skip_time_act": False, "cross_attention_norm": None,
    "class_embeddings_concat": False, "addition_time_embed_dim": None, "encoder_hid_dim_type": None,
    "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None,
}
"""config.json values ComfyUI's UNetModel reproduces (SD1.5's); anything else is refused."""


def unet_unet_config(config: Mapping[str, Any], where: Path = Path(CONFIG_FILE)) -> dict:
    """ComfyUI ``UNetModel`` unet_config for a diffusers ``UNet2DConditionModel`` config.json (SD1.5-like)."""
    for key, value in _UNET_FIXED.items():
        if key in config and config[key] != value:
            raise OrganismError(f"{where}: {key}={config[key]!r} is not supported (ComfyUI's SD1.5 U-Net "
                                f"needs {value!r})")
    channels = [int(c) for c in _need(config, "block_out_channels", where)]
    down = list(_need(config, "down_block_types", where))
    up = list(_need(config, "up_block_types", where))
    allowed_down, allowed_up = {"DownBlock2D", "CrossAttnDownBlock2D"}, {"UpBlock2D", "CrossAttnUpBlock2D"}
    if len(down) != len(channels) or len(up) != len(channels) or set(down) - allowed_down or set(up) - allowed_up:
        raise OrganismError(f"{where}: block types {down} / {up} are not supported: use (CrossAttn)DownBlock2D "
                            f"and (CrossAttn)UpBlock2D, one per entry of block_out_channels")
    base = channels[0]
    if any(c % base for c in channels):
        raise OrganismError(f"{where}: block_out_channels {channels} must be multiples of the first")
    layers = _need(config, "layers_per_block", where)
    layers = [int(layers)] * len(channels) if isinstance(layers, int) else [int(n) for n in layers]
    depth = _need(config, "transformer_layers_per_block", where)
    if not isinstance(depth, int):
        raise OrganismError(f"{where}: a per-block transformer_layers_per_block is not supported")
    heads = config.get("num_attention_heads") or _need(config, "attention_head_dim", where)  # diffusers' legacy name
    if not isinstance(heads, int):
        raise OrganismError(f"{where}: per-block attention heads {heads} are not supported")
    n = len(channels)
    return dict(
        image_size=int(config.get("sample_size") or LATENT_SIZE), in_channels=int(_need(config, "in_channels", where)),
        out_channels=int(_need(config, "out_channels", where)), model_channels=base, num_res_blocks=layers,
        channel_mult=[c // base for c in channels],
        transformer_depth=[depth if "CrossAttn" in down[level] else 0 for level in range(n) for _ in range(layers[level])],
        # ComfyUI lists output depths from the shallowest level up; up_blocks[0] is the deepest level.
        transformer_depth_output=[depth if "CrossAttn" in up[n - 1 - level] else 0
                                  for level in range(n) for _ in range(layers[level] + 1)],
        transformer_depth_middle=depth, context_dim=int(_need(config, "cross_attention_dim", where)),
        use_spatial_transformer=True, use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        legacy=False, adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False,
        use_checkpoint=False, num_heads=int(heads), num_head_channels=-1,
    )


# ----------------------------------------------------------------------------- state dict


def _keys_text(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMED_KEYS])
    return shown + (f" (+{len(keys) - _MAX_NAMED_KEYS} more)" if len(keys) > _MAX_NAMED_KEYS else "")


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], key_map: Mapping[str, Any],
                       expected: Mapping[str, torch.Size], source: str = "the organism") -> dict[str, torch.Tensor]:
    """diffusers ``state_dict`` -> ComfyUI keys with a ComfyUI key map (``diffusers key -> comfy key`` or
    ``(comfy key, (dim, start, length) or None[, fn])``, as ``comfy.utils.*_to_diffusers`` return).

    Strict: every diffusers key must be mapped, every ``expected`` key filled with its exact shape,
    concatenated pieces must tile their target; otherwise OrganismError naming the keys.
    """
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, list] = {}
    unexpected, duplicated = [], []
    for key in sorted(state_dict):
        tensor, target = state_dict[key], key_map.get(key)
        if target is None:
            unexpected.append(key)
            continue
        if isinstance(target, str):
            target = (target, None)
        name, offset = target[0], target[1]
        value = target[2](tensor) if len(target) > 2 and target[2] is not None else tensor
        if offset is None:
            if name in out or name in pieces:
                duplicated.append(name)
            out[name] = value
        else:
            if name in out:
                duplicated.append(name)
            pieces.setdefault(name, []).append((tuple(offset), key, value))
    bad_pieces = []
    for name, parts in pieces.items():
        parts.sort(key=lambda part: part[0][1])
        dim, position = parts[0][0][0], 0
        for (d, start, length), key, value in parts:
            if d != dim or start != position or value.shape[d] != length:
                bad_pieces.append(f"{name} ({key} at {start}, expected {position})")
                break
            position += length
        else:
            out[name] = torch.cat([value for _, _, value in parts], dim=dim)
    missing = sorted(set(expected) - set(out) - {n.split(" ")[0] for n in bad_pieces})
    extra = sorted(set(out) - set(expected))
    shapes = sorted(f"{k} {tuple(out[k].shape)} != {tuple(expected[k])}" for k in set(out) & set(expected)
                    if tuple(out[k].shape) != tuple(expected[k]))
    problems = []
    for label, keys in (("unexpected keys", unexpected), ("missing keys", missing), ("keys the model lacks", extra),
                        ("keys filled twice", sorted(duplicated)), ("incomplete concatenations", bad_pieces),
                        ("shape mismatches", shapes)):
        if keys:
            problems.append(f"{label} ({len(keys)}): {_keys_text(keys)}")
    if problems:
        raise OrganismError(f"{source} does not fit ComfyUI's model: " + "; ".join(problems)
                            + ". Is it a diffusers organism saved with the organism pipelines' save_pretrained?")
    return out


def organism_files(folder: str | os.PathLike, family: str) -> tuple[Path, Path]:
    """``(config.json, weights)`` of the organism at ``folder`` (the pipeline folder or its model subfolder)."""
    if family not in FAMILIES:
        raise OrganismError(f"unknown organism family {family!r}: use one of {', '.join(FAMILIES)}")
    root = Path(folder).expanduser()
    if not root.is_absolute():
        root = PLUGIN_ROOT / root
    sub = SUBFOLDERS[family]
    for candidate in (root / sub, root):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate / CONFIG_FILE, candidate / WEIGHTS_FILE
    if not root.is_dir():
        raise OrganismError(f"organism folder {root} does not exist: give a folder saved with the {family} "
                            f"organism's save_pretrained (containing {sub}/{WEIGHTS_FILE}), or leave it empty for "
                            f"the committed one")
    raise OrganismError(f"organism folder {root} lacks {sub}/{CONFIG_FILE} and {sub}/{WEIGHTS_FILE}: is it a "
                        f"{family} organism saved with save_pretrained (family {family!r} chosen)?")


def load_organism(family: str, folder: str | os.PathLike = ""):
    """A ``comfy.model_patcher.ModelPatcher`` around ComfyUI's own Flux / UNetModel with the organism's weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils
    from safetensors.torch import load_file

    config_path, weights_path = organism_files(folder or WEIGHTS / family, family)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise OrganismError(f"cannot read {config_path}: {error}") from None
    classes = comfy_classes()
    if family == "flux":
        unet_config = flux_unet_config(config, config_path)
        model_config = classes.OrganismFlux(unet_config)
        key_map = comfy.utils.flux_to_diffusers(unet_config)
    else:
        unet_config = unet_unet_config(config, config_path)
        model_config = classes.OrganismSD15(unet_config)
        key_map = comfy.utils.unet_to_diffusers(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    try:
        state_dict = load_file(str(weights_path), device="cpu")
    except Exception as error:  # safetensors raises its own error types
        raise OrganismError(f"cannot read {weights_path}: {error}") from None
    model = model_config.get_model({})
    net = model.diffusion_model
    expected = {k: v.shape for k, v in net.state_dict().items()}
    converted = convert_state_dict(state_dict, key_map, expected, source=str(weights_path))
    net.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    offload = comfy.model_management.unet_offload_device()
    model = model.to(offload)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=offload)


def organism_family(model) -> Optional[str]:
    """"flux" / "unet" for a MODEL from Load Model Organism, else None."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return getattr(config, "organism_family", None)


# ----------------------------------------------------------------------------- conditioning and latents


def conditioning(prompt: str) -> list:
    """ComfyUI CONDITIONING for ``prompt``: the sentence encoder's 16 token states, its pooled vector as
    ``pooled_output`` (Flux reads it as y; the U-Net ignores it, as SD1.5 ignores CLIPTextEncode's)."""
    encoded = shared_encoder()([str(prompt)])
    return [[encoded.tokens.float().clone(), {"pooled_output": encoded.pooled.float().clone()}]]


def empty_latent(batch_size: int) -> torch.Tensor:
    """Zeros of the organism's latent shape: (batch, 4, 16, 16), a 32x32 picture."""
    return torch.zeros(int(batch_size), LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)


def latent_to_image(latent: torch.Tensor, upscale: int = 1) -> torch.Tensor:
    """The exact decoder as a ComfyUI IMAGE (B, H, W, 3) in [0, 1]: the picture is gray, enlarged by
    nearest neighbour ``upscale`` times."""
    if latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
        raise OrganismError(f"Organism Decode takes the organism's (batch, {LATENT_CHANNELS}, H, W) latents, "
                            f"got shape {tuple(latent.shape)}: sample with Load Model Organism's MODEL")
    image = from_latent(latent.float().cpu())
    image = ((image.clamp(-1, 1) + 1) / 2).repeat(1, 3, 1, 1)
    if int(upscale) > 1:
        image = F.interpolate(image, scale_factor=int(upscale), mode="nearest")
    return image.movedim(1, -1).contiguous()


# ----------------------------------------------------------------------------- ComfyUI's CLIP and VAE roles


class OrganismCLIP:
    """The sentence encoder in ComfyUI's CLIP role: ComfyUI's own CLIP Text Encode node (and any node that
    encodes prompts through a CLIP) calls ``tokenize`` then ``encode_from_tokens_scheduled``."""

    def tokenize(self, text: str, **_: Any) -> str:
        return str(text)

    def encode_from_tokens_scheduled(self, tokens: str, **_: Any) -> list:
        return conditioning(tokens)

    def encode_from_tokens(self, tokens: str, return_pooled: bool = False, **_: Any):
        (states, extra), = conditioning(tokens)
        return (states, extra["pooled_output"]) if return_pooled else states


class OrganismVAE:
    """The organism's exact, lossless latent map in ComfyUI's VAE role (VAE Decode / VAE Encode and the
    real-image capture call ``decode`` / ``encode``). Pictures are 32x32 gray: ``encode`` averages colour and
    resizes (area) any image to that size first."""

    latent_channels = LATENT_CHANNELS
    image_size = 2 * LATENT_SIZE

    def spacial_compression_encode(self) -> int:
        return 2

    def spacial_compression_decode(self) -> int:
        return 2

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE ``(B, H, W, C)`` in [0, 1] -> latents ``(B, 4, 16, 16)``."""
        if pixels.ndim != 4 or pixels.shape[-1] not in (1, 3, 4):
            raise OrganismError(f"the organism VAE encodes ComfyUI IMAGEs (batch, height, width, 1/3/4 channels), "
                                f"got shape {tuple(pixels.shape)}")
        gray = pixels[..., :3].float().mean(-1, keepdim=True).movedim(-1, 1)
        if gray.shape[-2:] != (self.image_size, self.image_size):
            gray = F.interpolate(gray, size=(self.image_size, self.image_size), mode="area")
        return to_latent(gray.clamp(0, 1) * 2 - 1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, 4, h, w)`` -> IMAGE ``(B, 2h, 2w, 3)`` in [0, 1]."""
        return latent_to_image(latent)
