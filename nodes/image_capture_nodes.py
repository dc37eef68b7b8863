"""Capture Activations from Images: a site's activations on REAL images (Revelio's recipe).

Each image is encoded by the VAE, noised ONCE to a chosen sigma (Revelio: DDPM t=25 of 1000, sigma ~0.155)
with seeded noise, and given to the model for ONE forward pass with the positive conditioning (Revelio:
an empty prompt, i.e. CLIPTextEncode("")). A site function records the site's tokens, mean-pooled over
space per image when ``pool == "mean"``, into shards (``sae_core.ShardWriter``) that Train Dictionary reads.

The model pass goes through ComfyUI's own sampling machinery, ``comfy.sample.sample_custom`` with
sigmas ``[sigma, 0]``, cfg 1 and a one-call sampler function (:func:`_one_model_call`):

* ``CFGGuider.inner_sample`` applies the latent format (``model.process_latent_in``) and encodes the
  conditioning for this model (``process_conds``: cross-attention, pooled output, guidance, ...);
* ``KSAMPLER.sample`` noises the latent with the model sampling's ``noise_scaling(sigma, noise, latent)``,
  so eps (SD1.5) and flow (Flux) models are both noised the way their samplers would;
* our sampler function then calls the wrapped model once (``sampling_function`` -> ``calc_cond_batch``
  -> ``apply_model``); with cfg 1 ComfyUI skips the negative, so only the positive rows run.

Models are loaded and unloaded, and wrappers/patches applied, exactly as for a KSampler run. The MODEL
given to the node is never changed: the site function lives on a clone (``adapter.patch``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..sae_core import DictionaryError, ShardWriter
from ..sae_core.intervention import SiteContext
from .common import CATEGORY, SITE_HELP, resolve_site

POOLS = ("mean", "none")


def _one_model_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A k-diffusion style sampler function that evaluates the model once at ``sigmas[0]`` and stops."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    return model(x, sigmas[0] * s_in, **extra_args)


def _capture_folder(folder: str) -> Path:
    import folder_paths

    output = Path(folder_paths.get_output_directory()).resolve()
    directory = (output / folder.strip()).resolve()
    if not folder.strip() or output not in directory.parents:
        raise DictionaryError(f"capture folder {folder!r} must be a relative path inside ComfyUI's output folder")
    return directory


def _zero_conditioning(model):
    """A stand-in for an empty prompt when no conditioning is wired: zero text tokens of the model's width
    (like ConditioningZeroOut). Revelio's own recipe is CLIPTextEncode("") wired to ``positive``."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    width = config.get("context_dim") or config.get("context_in_dim")
    if not width:
        raise DictionaryError("no positive conditioning: wire CLIPTextEncode with an empty prompt to 'positive'")
    extra = {}
    if config.get("vec_in_dim"):
        extra["pooled_output"] = torch.zeros(1, int(config["vec_in_dim"]))
    return [[torch.zeros(1, 77, int(width)), extra]]


class _Recorder:
    """Site function: keeps the site's tokens of the current image (pooled or not); returns ``h`` untouched."""

    def __init__(self, pool: str):
        self.pool = pool
        self.taken: Optional[torch.Tensor] = None

    def __call__(self, h: torch.Tensor, ctx: SiteContext) -> torch.Tensor:
        acts = h.detach().float()
        if self.pool == "mean":
            acts = acts.mean(dim=1, keepdim=True)
        self.taken = acts.cpu().clone()
        return h


class SAECaptureFromImages:
    """Record one site's activations on real images (VAE-encoded, noised once to ``sigma``, one model
    pass) into ``output/<folder>``: shards for Train Dictionary (give it the returned folder)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "vae": ("VAE",),
                "images": ("IMAGE",),
                "site": ("STRING", {"default": "middle_block:residual", "tooltip": SITE_HELP}),
                "sigma": ("FLOAT", {"default": 0.155, "min": 0.0001, "max": 1000.0, "step": 0.001,
                                    "tooltip": "noise level of the single pass (Revelio: t=25 of 1000 on SD1.5, ~0.155)"}),
                "pool": (list(POOLS), {"tooltip": "mean: one vector per image (mean over the site's tokens); "
                                                  "none: every token"}),
                "folder": ("STRING", {"default": "sae_activations/images1",
                                      "tooltip": "inside ComfyUI's output folder"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "Revelio uses an empty prompt: CLIPTextEncode(\"\")"}),
            },
        }

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("summary", "shards_folder")
    FUNCTION = "capture"
    CATEGORY = f"{CATEGORY}/capture"
    OUTPUT_NODE = True

    def capture(self, model, vae, images, site, sigma, pool, folder, seed, positive=None):
        import comfy.sample
        import comfy.samplers
        import comfy.utils

        if pool not in POOLS:
            raise DictionaryError(f"pool {pool!r}: use one of {', '.join(POOLS)}")
        if not sigma > 0:
            raise DictionaryError(f"sigma {sigma}: the noise level must be > 0")
        adapter, where, width = resolve_site(model, site)
        directory = _capture_folder(folder)
        if positive is None:
            positive = _zero_conditioning(model)

        latents = vae.encode(images[:, :, :, :3]).detach().float().cpu()
        noise = comfy.sample.prepare_noise(latents, int(seed))  # one seeded generator for the whole batch
        recorder = _Recorder(pool)
        patched = adapter.patch(model, {where: recorder})
        sampler = comfy.samplers.KSAMPLER(_one_model_call)
        sigmas = torch.tensor([float(sigma), 0.0])
        bar = comfy.utils.ProgressBar(latents.shape[0])

        writer = ShardWriter(directory, where, dtype=torch.float32,
                             extra={"source": "images", "sigma": float(sigma), "pool": pool})
        first = writer.next_sample_id
        try:
            for i in range(latents.shape[0]):
                recorder.taken = None
                comfy.sample.sample_custom(patched, noise[i:i + 1], 1.0, sampler, sigmas, positive, positive,
                                           latents[i:i + 1], disable_pbar=True, seed=int(seed))
                if recorder.taken is None:
                    raise DictionaryError(f"site {where.name} did not run during the model pass")
                acts = recorder.taken[:1]  # (1, tokens, d): the positive row
                n = acts.shape[1]
                token = torch.full((1, n), -1, dtype=torch.long) if pool == "mean" else torch.arange(n)[None]
                writer.add(acts, first + i, token, float(sigma))
                bar.update_absolute(i + 1, latents.shape[0])
        finally:
            writer.close()
        per_image = "1 pooled vector" if pool == "mean" else f"{n} tokens"
        summary = (f"captured {latents.shape[0]} image(s) x {per_image} of width {width} at "
                   f"{where.name}, sigma={float(sigma):g}, into {directory} ({writer.n_tokens} vectors in all)")
        return {"ui": {"text": [summary]}, "result": (summary, str(directory))}
