"""Capture Activations from Images: a site's activations on REAL images (Revelio's recipe).

Each image is encoded by the VAE, noised ONCE to a chosen sigma (Revelio: DDPM t=25 of 1000, sigma ~0.155)
with seeded noise, and given to the model for ONE forward pass with the positive conditioning (Revelio:
an empty prompt, i.e. CLIPTextEncode("")). The engine's Recorder keeps the site's tokens, mean-pooled over
space per image when ``pool == "mean"``, and they go into shards (``sae_core.ShardWriter``) that Train
Dictionary reads.

The model pass goes through ComfyUI's own sampling machinery, ``comfy.sample.sample_custom`` with
sigmas ``[sigma, 0]``, cfg 1 and a one-call sampler function (:func:`_one_model_call`):

* ``CFGGuider.inner_sample`` applies the latent format (``model.process_latent_in``) and encodes the
  conditioning for this model (``process_conds``: cross-attention, pooled output, guidance, ...);
* ``KSAMPLER.sample`` noises the latent with the model sampling's ``noise_scaling(sigma, noise, latent)``,
  so eps (SD1.5) and flow (Flux) models are both noised the way their samplers would;
* our sampler function then calls the wrapped model once (``sampling_function`` -> ``calc_cond_batch``
  -> ``apply_model``); with cfg 1 ComfyUI skips the negative, so only the positive rows run.

Models are loaded and unloaded, and wrappers/patches applied, exactly as for a KSampler run. The MODEL
given to the node is never changed: the site function lives on a clone (``patch_site``).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from comfy_api.latest import io, ui

from ..sae_core import ConfigError, InputError, Recorder, ShardWriter, SiteError, write_records
from .adapters import patch_site
from .common import (CATEGORY, check_choices, checked_images, output_folder, paths_named_from_output,
                     relative_to_output, require_choices, site_input)


def _one_model_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A k-diffusion style sampler function that evaluates the model once at ``sigmas[0]`` and stops."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    return model(x, sigmas[0] * s_in, **extra_args)


def _zero_conditioning(model):
    """A stand-in for an empty prompt when no conditioning is wired: zero text tokens of the model's width
    (like ConditioningZeroOut). Revelio's own recipe is CLIPTextEncode("") wired to ``positive``."""
    width = _text_width(model)
    if not width:
        raise InputError("no positive conditioning: wire CLIPTextEncode with an empty prompt to 'positive'")
    config = _unet_config(model)
    extra = {}
    if config.get("vec_in_dim"):
        extra["pooled_output"] = torch.zeros(1, int(config["vec_in_dim"]))
    return [[torch.zeros(1, 77, width), extra]]


def _unet_config(model) -> dict:
    return getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}


def _text_width(model) -> Optional[int]:
    """The width of the text tokens the model's cross-attention (U-Net) or text input (Flux-like) takes."""
    config = _unet_config(model)
    width = config.get("context_dim") or config.get("context_in_dim")
    return int(width) if width else None


def model_latent_channels(model) -> int:
    """The latent channels the model's first layer takes: its ``in_channels``, or its latent format's when the
    model concatenates extra channels (inpainting, image-to-video) or does not say."""
    base = model.model
    channels = _unet_config(model).get("in_channels")
    if channels is None or getattr(base, "concat_keys", ()):
        return int(base.latent_format.latent_channels)
    return int(channels)


def check_vae_fits(vae, model, images: torch.Tensor) -> None:
    """Refuse a VAE whose latents the model cannot take (an SDXL VAE for Flux, ...) before any work, naming both
    channel counts, instead of a shape error from deep inside the model; and images smaller than one latent."""
    if not (hasattr(vae, "latent_channels") and hasattr(vae, "encode")):
        raise InputError(f"vae is a {type(vae).__name__}, not a VAE: connect the model's VAE (e.g. Load VAE)")
    latent = int(vae.latent_channels)
    expected = model_latent_channels(model)
    if latent != expected:
        raise InputError(f"the VAE makes {latent}-channel latents but the model takes {expected} channels: connect "
                         "the VAE that belongs to this model")
    scale = int(vae.spacial_compression_encode())
    if min(images.shape[1:3]) < scale:
        raise InputError(f"images of {images.shape[2]}x{images.shape[1]} pixels are smaller than one latent of this "
                         f"VAE ({scale}x{scale}): use larger images")


def check_conditioning(conditioning: Any, model, name: str = "positive") -> None:
    """Refuse conditioning (the input ``name``) that is not CONDITIONING, or whose text tokens have another width
    than the model's text input (a prompt encoded for another model)."""
    try:
        tokens = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        tokens = None
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        raise InputError(f"{name} is not CONDITIONING: connect a text encoder's output (e.g. CLIPTextEncode)")
    width = _text_width(model)
    if width and tokens.shape[-1] != width:
        raise InputError(f"{name} has {tokens.shape[-1]}-wide text tokens but the model takes {width}: "
                         "encode the prompt with this model's text encoder")


class SAECaptureFromImages(io.ComfyNode):
    """Real images -> one noised model pass each -> a site's activations in shards."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAECaptureFromImages",
            display_name="Capture Activations from Images",
            category=f"{CATEGORY}/capture",
            description=("Records one site's activations on real images (Revelio): each image is VAE-encoded, "
                         "noised once to sigma and given to the model for one pass; the site's tokens (or their "
                         "mean per image) go into shards in ComfyUI's output folder for Train Dictionary."),
            inputs=[
                io.Model.Input("model", tooltip="the model whose site is recorded (left unchanged)"),
                io.Vae.Input("vae", tooltip="the model's VAE, to encode the images into latents"),
                io.Image.Input("images", tooltip="the pictures to record (a batch; an alpha channel is dropped)"),
                site_input("middle_block:residual"),
                io.Float.Input("sigma", default=0.155, min=0.0001, max=1000.0, step=0.001,
                               tooltip="noise level of the single pass (Revelio: t=25 of 1000 on SD1.5, ~0.155)"),
                io.Combo.Input("pool", options=["mean", "none"],
                               tooltip="mean: one vector per image (mean over the site's tokens); none: every token"),
                io.String.Input("folder", default="sae_activations/images1",
                                tooltip="shards folder inside ComfyUI's output folder; a rerun adds to it"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="seed of the noise each image gets"),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="the prompt of the pass; Revelio uses an empty one: CLIPTextEncode(\"\") "
                                              "(unconnected: zero text tokens)"),
            ],
            outputs=[io.String.Output(display_name="summary", tooltip="what was captured, and where"),
                     io.String.Output(display_name="shards_folder",
                                             tooltip="the shards folder (inside output/), for Train Dictionary")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, pool: Optional[str] = None) -> bool | str:
        return check_choices(cls, pool=pool)

    @classmethod
    def execute(cls, model, vae, images: torch.Tensor, site: str, sigma: float, pool: str, folder: str, seed: int,
                positive=None) -> io.NodeOutput:
        import comfy.sample
        import comfy.samplers
        import comfy.utils

        require_choices(cls, pool=pool)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"sigma {sigma}: the noise level must be a number > 0")
        images = checked_images(images)
        recorder = Recorder(pool=pool)
        patched, where = patch_site(model, site, recorder)
        width = int(where.extra["d"])
        check_vae_fits(vae, model, images)
        directory = output_folder(folder)
        if positive is None:
            positive = _zero_conditioning(model)
        check_conditioning(positive, model)

        latents = vae.encode(images).detach().float().cpu()
        noise = comfy.sample.prepare_noise(latents, int(seed))  # one seeded generator for the whole batch
        sampler = comfy.samplers.KSAMPLER(_one_model_call)
        sigmas = torch.tensor([float(sigma), 0.0])
        bar = comfy.utils.ProgressBar(latents.shape[0])

        with paths_named_from_output():
            writer = ShardWriter(directory, where, dtype=torch.float32,
                                 extra={"source": "images", "sigma": float(sigma), "pool": pool})
            first = writer.next_sample_id
            try:
                for i in range(latents.shape[0]):
                    recorder.begin([first + i])
                    comfy.sample.sample_custom(patched, noise[i:i + 1], 1.0, sampler, sigmas, positive, positive,
                                               latents[i:i + 1], disable_pbar=True, seed=int(seed))
                    records = recorder.take()
                    if not records:
                        raise SiteError(f"site {where.name} did not run during the model pass")
                    n = records[0].tokens.shape[1]
                    write_records(writer, records[:1], torch.tensor([first + i]))
                    bar.update_absolute(i + 1, latents.shape[0])
            finally:
                writer.close()
        per_image = "1 pooled vector" if pool == "mean" else f"{n} tokens"
        summary = (f"captured {latents.shape[0]} image(s) x {per_image} of width {width} at "
                   f"{where.name}, sigma={float(sigma):g}, into output/{relative_to_output(directory)} "
                   f"({writer.n_tokens} vectors in all)")
        return io.NodeOutput(summary, relative_to_output(directory), ui=ui.PreviewText(summary))
