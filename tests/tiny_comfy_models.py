"""Tiny REAL ComfyUI models with random weights, and a sampler call, for tests.

    patcher = tiny_flux_patcher(seed=0)     # comfy.ldm.flux.model.Flux in a ModelPatcher (64 wide, 2+2 blocks)
    patcher = tiny_sd15_patcher(seed=0)     # comfy UNetModel configured as SD1.5 (32 channels, 2 levels)
    positive, negative = random_conditioning(patcher, seed=1)
    latent = random_latent(seed=2)           # (1, 4, 8, 8), non-zero
    out = sample(patcher, seed=3, positive=positive, negative=negative, latent=latent, cfg=2.0)

The models are built the way ComfyUI builds real ones (``comfy.supported_models.<Family>(unet_config)
.get_model({})`` -> ``comfy.model_patcher.ModelPatcher``), without state-dict detection (it would guess
the head count of a 64-wide Flux wrong). ComfyUI's ``disable_weight_init`` layers leave their weights
uninitialised, so every parameter is filled here from a seeded generator: the same seed gives the
same model, bit for bit. Sampling runs ``comfy.sample.sample`` on CPU (euler, 3 steps by default) and
takes well under a second for either model.

ComfyUI is imported inside the functions only: import this module freely, call it after the
``comfyui`` fixture has made ComfyUI importable.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

LATENT_CHANNELS = 4  # both tiny models take 4-channel latents (Flux: 4 x 2 x 2 patches = 16 inputs)
LATENT_SIZE = 8  # 8x8 latent: Flux -> a 4x4 grid of 16 image tokens; SD1.5 -> 8x8 and 4x4 feature maps
TEXT_TOKENS = 8

FLUX_CONFIG = dict(
    image_model="flux", in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, vec_in_dim=32,
    context_in_dim=48, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2,
    axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
)
"""``comfy.supported_models.Flux`` unet_config of the tiny Flux (dev-style: guidance embedding)."""

SD15_CONFIG = dict(
    image_size=32, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, model_channels=32,
    num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1, context_dim=64, use_spatial_transformer=True, use_linear_in_transformer=True,
    legacy=False, adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False,
    use_checkpoint=False,
)
"""``comfy.supported_models.SD15`` unet_config of the tiny U-Net: input_blocks 0-3, middle_block,
output_blocks 0-3; channels 32 (8x8) and 64 (4x4); context width 64."""

SD15_LAYOUT_CONFIG = dict(
    SD15_CONFIG, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
)
"""SD1.5's real block layout (12 input and 12 output blocks, attention on the first three levels) at
32 base channels instead of 320: for checks of block numbering (Revelio's up_ft1/up_ft2)."""

SDXL_CONFIG = dict(
    SD15_CONFIG, channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
    context_dim=2048, adm_in_channels=2816, num_classes="sequential",
)
"""A tiny U-Net with SDXL's conditioning widths (context 2048, adm 2816), for family detection."""

FLUX_TEXT_WIDTH = FLUX_CONFIG["context_in_dim"]
FLUX_POOLED_WIDTH = FLUX_CONFIG["vec_in_dim"]
SD15_TEXT_WIDTH = SD15_CONFIG["context_dim"]


def _fill_weights(module: torch.nn.Module, seed: int) -> None:
    """Deterministic init: matrices ~ N(0, 1/fan_in), biases small, norm scales 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            leaf = name.rsplit(".", 1)[-1]
            if param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                values = torch.randn(param.shape, generator=g) / math.sqrt(fan_in)
            elif leaf == "bias":
                values = torch.randn(param.shape, generator=g) * 0.02
            else:  # norm scales (GroupNorm/LayerNorm weight, RMSNorm scale)
                values = torch.ones(param.shape)
            param.copy_(values.to(param.dtype))
        for name, buffer in module.named_buffers():
            if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                buffer.zero_()


def _patcher(model_config, seed: int):
    import comfy.model_management
    import comfy.model_patcher

    model = model_config.get_model({})
    _fill_weights(model.diffusion_model, seed)
    device = torch.device("cpu")
    size = comfy.model_management.module_size(model)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device, size=size)


def tiny_flux_patcher(seed: int = 0):
    """A ModelPatcher around a real ``comfy.ldm.flux.model.Flux`` (hidden 64, 2 double + 2 single blocks)."""
    import comfy.supported_models

    config = comfy.supported_models.Flux(dict(FLUX_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config, seed)


def tiny_sd15_patcher(seed: int = 0, full_layout: bool = False):
    """A ModelPatcher around a real ComfyUI ``UNetModel`` configured as SD1.5 (``supported_models.SD15``).

    ``full_layout``: SD1.5's own block layout (:data:`SD15_LAYOUT_CONFIG`) instead of the 2-level one.
    """
    import comfy.supported_models

    return _unet_patcher(comfy.supported_models.SD15, SD15_LAYOUT_CONFIG if full_layout else SD15_CONFIG, seed)


def tiny_sdxl_patcher(seed: int = 0):
    """A ModelPatcher around a tiny ``UNetModel`` with ``supported_models.SDXL`` (not meant for sampling)."""
    import comfy.supported_models

    return _unet_patcher(comfy.supported_models.SDXL, SDXL_CONFIG, seed)


def tiny_unet_patcher(config_class, seed: int = 0, **overrides):
    """A tiny U-Net under any ``comfy.supported_models`` class (e.g. SD20, to see it refused)."""
    return _unet_patcher(config_class, dict(SD15_CONFIG, **overrides), seed)


def _unet_patcher(config_class, unet_config: dict, seed: int):
    config = config_class(dict(unet_config))
    config.unet_config.update(num_heads=-1, num_head_channels=16)  # the classes' extra config sets heads
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config, seed)


def is_flux(patcher) -> bool:
    return type(patcher.model.diffusion_model).__name__ == "Flux"


def random_conditioning(patcher, seed: int = 1, batch: int = 1, tokens: int = TEXT_TOKENS):
    """``(positive, negative)`` CONDITIONING lists of the right widths for the tiny model."""
    g = torch.Generator().manual_seed(seed)

    def one():
        if is_flux(patcher):
            return [[torch.randn(batch, tokens, FLUX_TEXT_WIDTH, generator=g),
                     {"pooled_output": torch.randn(batch, FLUX_POOLED_WIDTH, generator=g), "guidance": 3.5}]]
        return [[torch.randn(batch, tokens, SD15_TEXT_WIDTH, generator=g), {}]]

    return one(), one()


def random_latent(seed: int = 2, batch: int = 1, size: int | tuple[int, int] = LATENT_SIZE) -> torch.Tensor:
    """A non-zero ``(batch, 4, h, w)`` latent (ComfyUI widens an all-zero latent to the model's channels)."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT_CHANNELS, h, w, generator=g) * 0.1


def sample(patcher, seed: int = 0, steps: int = 3, cfg: float = 1.0, positive=None, negative=None,
           latent: Optional[torch.Tensor] = None, sampler_name: str = "euler", scheduler: str = "simple",
           denoise: float = 1.0) -> torch.Tensor:
    """Run ComfyUI's ``comfy.sample.sample`` on CPU; returns the sampled latent.

    Missing conditioning or latent are drawn from fixed seeds (see :func:`random_conditioning`,
    :func:`random_latent`); the noise comes from ``seed`` through a local generator (no global RNG).
    """
    import comfy.sample

    if positive is None or negative is None:
        pos, neg = random_conditioning(patcher)
        positive = pos if positive is None else positive
        negative = neg if negative is None else negative
    if latent is None:
        latent = random_latent(batch=positive[0][0].shape[0])
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed), dtype=latent.dtype)
    with torch.no_grad():
        return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   denoise=denoise, disable_pbar=True, seed=seed)


def model_node(name: str, builder: Callable[[int], Any]) -> type:
    """A test-only ComfyUI node class ``name`` returning ``builder(seed)``, built once per seed."""
    cache: dict[int, Any] = {}

    def load(self, seed: int):
        if seed not in cache:
            cache[seed] = builder(seed)
        return (cache[seed],)

    return type(name, (), {
        "INPUT_TYPES": classmethod(lambda cls: {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}),
        "RETURN_TYPES": ("MODEL",), "FUNCTION": "load", "CATEGORY": "_for_testing", "load": load,
    })
