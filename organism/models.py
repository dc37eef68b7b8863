"""The model organism's two denoisers: real diffusers architectures at a size a CPU trains and samples.

Both generate 32x32 one-channel images. Their "VAE" is exact and free: the latent is the image
rearranged by ``pixel_unshuffle(2)`` into 4 channels at 16x16, the shape of an SD latent, so the
denoisers see latents laid out as the real families' do and both runtimes' code paths apply as is.

* Flux: ``FluxTransformer2DModel`` with 2 double-stream and 2 single-stream blocks, width 128, trained
  by rectified flow. As in Flux, 2x2 patches of the latent become tokens: 8x8 = 64 image tokens of 16
  values, plus 16 text tokens from the sentence encoder (``joint_attention_dim`` 384).
* SD-style U-Net: ``UNet2DConditionModel`` with three levels (32, 64, 64 channels; 16, 8 and 4 px),
  cross-attention to the encoder's tokens at the lower two, trained with v-prediction on SD 1.5's beta
  schedule rescaled to zero terminal SNR (see DDPM_CONFIG).
"""
from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor

LATENT_CHANNELS = 4
LATENT_SIZE = 16
GRID = 8  # image tokens per side: LATENT_SIZE / Flux's 2x2 packing

FLUX_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=384, pooled_projection_dim=384, guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=384, attention_head_dim=4, norm_num_groups=32,
)

DDPM_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", rescale_betas_zero_snr=True,
)
"""SD 1.5's betas rescaled to zero terminal SNR, with v-prediction (as SD 2.1 / Lin et al. 2024). In pixel
space the plain schedule leaks the image mean through its last step (sqrt(alpha_bar) = 0.07): sampling
from pure noise then gets each latent channel's offset wrong, which shows as a checkerboard."""


def build_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**FLUX_CONFIG)


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def to_latent(images: Tensor) -> Tensor:
    """(B, 1, 32, 32) images -> (B, 4, 16, 16) latents (lossless)."""
    return torch.nn.functional.pixel_unshuffle(images, 2)


def from_latent(latents: Tensor) -> Tensor:
    """Inverse of :func:`to_latent`."""
    return torch.nn.functional.pixel_shuffle(latents, 2)


def pack(latents: Tensor) -> Tensor:
    """(B, 4, 16, 16) -> (B, 64, 16): row-major 2x2 patches, the token layout of Flux in both runtimes."""
    return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)


def unpack(tokens: Tensor) -> Tensor:
    """Inverse of :func:`pack`."""
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=GRID, p=2, q=2)


def flux_ids(n_text: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Flux's rotary position ids: text tokens all at 0, image tokens at (0, row, col)."""
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return torch.zeros(n_text, 3, device=device), img_ids.to(device)


def flux_velocity(model, x_tokens: Tensor, sigma: Tensor, text_tokens: Tensor, pooled: Tensor) -> Tensor:
    """The transformer's flow prediction (noise - data) for packed tokens at noise level ``sigma`` (B,)."""
    txt_ids, img_ids = flux_ids(text_tokens.shape[1], x_tokens.device)
    return model(hidden_states=x_tokens, encoder_hidden_states=text_tokens, pooled_projections=pooled,
                 timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
