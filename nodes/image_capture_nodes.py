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

from typing import Optional

import torch
from comfy_api.latest import io, ui

from ..sae_core import ConfigError, InputError, Recorder, ShardWriter, SiteError, write_records
from .adapters import patch_site
from .common import CATEGORY, check_choices, output_folder, site_input


def _one_model_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A k-diffusion style sampler function that evaluates the model once at ``sigmas[0]`` and stops."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    return model(x, sigmas[0] * s_in, **extra_args)


def _zero_conditioning(model):
    """A stand-in for an empty prompt when no conditioning is wired: zero text tokens of the model's width
    (like ConditioningZeroOut). Revelio's own recipe is CLIPTextEncode("") wired to ``positive``."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    width = config.get("context_dim") or config.get("context_in_dim")
    if not width:
        raise InputError("no positive conditioning: wire CLIPTextEncode with an empty prompt to 'positive'")
    extra = {}
    if config.get("vec_in_dim"):
        extra["pooled_output"] = torch.zeros(1, int(config["vec_in_dim"]))
    return [[torch.zeros(1, 77, int(width)), extra]]


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
                     io.String.Output(display_name="shards_folder", tooltip="the shards folder, for Train Dictionary")],
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

        if not sigma > 0:
            raise ConfigError(f"sigma {sigma}: the noise level must be > 0")
        recorder = Recorder(pool=pool)
        patched, where = patch_site(model, site, recorder)
        width = int(where.extra["d"])
        directory = output_folder(folder)
        if positive is None:
            positive = _zero_conditioning(model)

        latents = vae.encode(images[:, :, :, :3]).detach().float().cpu()
        noise = comfy.sample.prepare_noise(latents, int(seed))  # one seeded generator for the whole batch
        sampler = comfy.samplers.KSAMPLER(_one_model_call)
        sigmas = torch.tensor([float(sigma), 0.0])
        bar = comfy.utils.ProgressBar(latents.shape[0])

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
                   f"{where.name}, sigma={float(sigma):g}, into {directory} ({writer.n_tokens} vectors in all)")
        return io.NodeOutput(summary, str(directory), ui=ui.PreviewText(summary))
