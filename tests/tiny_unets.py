"""Tiny U-Nets of the four U-Net families, the SAME network in diffusers and in ComfyUI's own classes.

    pair = unet_pair("sdxl", seed=0)        # .diffusers: UNet2DConditionModel; .comfy: a ModelPatcher
    x, t, tokens, added, y = unet_inputs(pair, seed=1)
    pair.diffusers(x, t, encoder_hidden_states=tokens, added_cond_kwargs=added)
    pair.comfy.model.diffusion_model(x, t, context=tokens, y=y)     # the same numbers

Each family keeps its real conditioning widths (what both runtimes' family rules read: SD 2.x's
1024-wide text tokens, SDXL's 2048 and 2816-wide added embedding, the refiner's 1280 and 2560) and its
real kind of layout (SD 1.5 / 2.x: the deepest level without attention; SDXL / refiner: the first),
at 32/64 channels and two levels. The diffusers model is built with a seeded default init; ComfyUI's
``comfy.supported_models.<Family>(unet_config).get_model({})`` receives its weights through ComfyUI's
own key map (``comfy.utils.unet_to_diffusers``) and the organism's strict converter. ComfyUI and
diffusers are imported inside the functions: call them after the ``comfyui`` fixture (and the
torchvision workaround) ran.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

B, TOKENS, LATENT = 2, 8, 8
CHANNELS = (32, 64)  # ComfyUI's GroupNorm has 32 groups: widths must be multiples of 32
HEADS = 2
POOLED = 1280  # SDXL's pooled text embedding (OpenCLIP bigG), both SDXL models
TIME_ID = 256  # SDXL's per-number size/crop embedding width

FAMILIES = {
    # family: (ComfyUI config class, context width, adm width, attention per level, resnets per level,
    #          transformer depth per level, SDXL-style time ids or None)
    "sd15": ("SD15", 64, None, (True, False), (1, 1), (1, 0), None),
    "sd2": ("SD20", 1024, None, (True, False), (1, 1), (1, 0), None),
    "sdxl": ("SDXL", 2048, POOLED + 6 * TIME_ID, (False, True), (2, 2), (0, 2), 6),
    "sdxl_refiner": ("SDXLRefiner", 1280, POOLED + 5 * TIME_ID, (False, True), (1, 1), (0, 1), 5),
}


@dataclass
class UNetPair:
    family: str
    diffusers: Any
    """diffusers ``UNet2DConditionModel`` (eval mode)."""
    comfy: Any
    """ComfyUI ModelPatcher around ``comfy.supported_models.<Family>``'s model with the same weights."""
    unet_config: dict
    context: int
    time_ids: Optional[int]


def diffusers_config(family: str) -> dict:
    """``UNet2DConditionModel`` keyword arguments of the tiny ``family`` U-Net."""
    _, context, adm, attention, layers, depth, time_ids = FAMILIES[family]
    config = dict(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=CHANNELS, layers_per_block=layers,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=context, attention_head_dim=HEADS, norm_num_groups=32,
        transformer_layers_per_block=tuple(max(d, 1) for d in depth), use_linear_projection=family != "sd15",
    )
    if time_ids is not None:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=TIME_ID,
                      projection_class_embeddings_input_dim=adm)
    return config


def comfy_unet_config(family: str) -> dict:
    """ComfyUI ``unet_config`` of the same network (output depths listed shallowest level first)."""
    _, context, adm, attention, layers, depth, _ = FAMILIES[family]
    levels = range(len(CHANNELS))
    middle = max(depth[-1], 1)  # diffusers: the mid block takes the deepest level's transformer depth
    config = dict(
        image_size=LATENT, in_channels=4, out_channels=4, model_channels=CHANNELS[0],
        channel_mult=[c // CHANNELS[0] for c in CHANNELS], num_res_blocks=list(layers),
        transformer_depth=[depth[level] if attention[level] else 0 for level in levels for _ in range(layers[level])],
        transformer_depth_output=[depth[level] if attention[level] else 0 for level in levels
                                  for _ in range(layers[level] + 1)],
        transformer_depth_middle=middle, context_dim=context, use_spatial_transformer=True,
        use_linear_in_transformer=family != "sd15", legacy=False, adm_in_channels=adm,
        use_temporal_resblock=False, use_temporal_attention=False, use_checkpoint=False,
    )
    if adm is not None:
        config["num_classes"] = "sequential"
    return config


@functools.lru_cache(maxsize=None)
def unet_pair(family: str, seed: int = 0) -> UNetPair:
    """The tiny ``family`` U-Net in both runtimes, same weights (built once per family and seed)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from organism.comfy import convert_state_dict

    with torch.random.fork_rng():  # diffusers initialises from the global generator: seed it, then restore it
        torch.manual_seed(seed)
        model = UNet2DConditionModel(**diffusers_config(family)).eval()
    with torch.no_grad():  # default init leaves norms at 1/0 and some projections at 0: make every weight count
        g = torch.Generator().manual_seed(seed + 1)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.02)
    unet_config = comfy_unet_config(family)
    config = getattr(comfy.supported_models, FAMILIES[family][0])(dict(unet_config))
    config.unet_config.update(num_heads=HEADS, num_head_channels=-1)  # the classes' extra config sets heads
    config.set_inference_dtype(torch.float32, None)
    comfy_model = config.get_model({})
    net = comfy_model.diffusion_model
    expected = {k: v.shape for k, v in net.state_dict().items()}
    converted = convert_state_dict(model.state_dict(), comfy.utils.unet_to_diffusers(unet_config), expected,
                                   source=f"the tiny {family} U-Net")
    net.load_state_dict(converted, strict=True)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(comfy_model, load_device=cpu, offload_device=cpu,
                                               size=comfy.model_management.module_size(comfy_model))
    return UNetPair(family, model, patcher, unet_config, FAMILIES[family][1], FAMILIES[family][6])


def unet_inputs(pair: UNetPair, seed: int = 1):
    """``(x, timesteps, tokens, added_cond_kwargs or None, y or None)`` for one direct call of both networks;
    ``y`` is ComfyUI's form of diffusers' added embedding input (pooled text, then the embedded time ids)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, LATENT, LATENT, generator=g)
    t = torch.tensor([500.0, 500.0])
    tokens = torch.randn(B, TOKENS, pair.context, generator=g)
    if pair.time_ids is None:
        return x, t, tokens, None, None
    added = {"text_embeds": torch.randn(B, POOLED, generator=g),
             "time_ids": torch.randint(0, 1024, (B, pair.time_ids), generator=g).float()}
    with torch.no_grad():
        times = pair.diffusers.add_time_proj(added["time_ids"].flatten()).reshape(B, -1)
    return x, t, tokens, added, torch.cat([added["text_embeds"], times], dim=1)


def conditioning(pair: UNetPair, seed: int = 1) -> tuple[list, list]:
    """``(positive, negative)`` ComfyUI CONDITIONING of the right widths for sampling ``pair.comfy``."""
    g = torch.Generator().manual_seed(seed)

    def one() -> list:
        extra = {"pooled_output": torch.randn(1, POOLED, generator=g)} if pair.time_ids is not None else {}
        return [[torch.randn(1, TOKENS, pair.context, generator=g), extra]]

    return one(), one()
