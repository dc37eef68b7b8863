"""A text-to-image or text-to-video pipeline behind one call: load it by name, generate with site functions attached.

``load_runner("organism-flux")`` (the committed model organism), a local pipeline folder, or a Hugging
Face Hub id (Flux, SD 1.5, SDXL, and the diffusion transformers of :mod:`training.adapters.transformers`:
SD3, Flux 2, Chroma, Qwen-Image, ..., and the video ones: Wan, HunyuanVideo, LTX-Video; read from the local
cache when offline). ``Runner.generate`` runs the
pipeline with :func:`training.adapters.attach` and a :class:`~training.adapters.SamplingState`, so site
functions see sigma, progress and which rows are the prompt's, whatever the pipeline.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from sae_core import InputError, Site, SiteError, SiteFunction

from .adapters import SamplingState, attach, available_sites, resolve_site
from .compat import apply_torchvision_workaround

log = logging.getLogger("training.runner")
ORGANISMS = ("organism-flux", "organism-unet")


@dataclass(frozen=True)
class VideoSize:
    """What a video pipeline generates: pixel frames, height and width (frames as its VAE needs: 4k + 1 for Wan
    and HunyuanVideo, 8k + 1 for LTX-Video)."""

    frames: int
    height: int
    width: int


@dataclass(frozen=True)
class PipelineDefaults:
    """How a kind of pipeline is sampled unless told otherwise, and how it runs guidance."""

    steps: int
    guidance: float
    cfg: str
    """The rows' layout under classifier-free guidance (a ``SamplingState`` guidance mode); "none" for
    guidance-distilled pipelines, which call the denoiser once per step whatever the scale."""
    cfg_above: float = 1.0
    """Guidance scales above this run classifier-free guidance (Z-Image: above 0)."""
    video: Optional[VideoSize] = None
    """Video pipelines only: the clip's size. The pipelines' own height and width, but 17 frames instead of their
    81 to 161: activations for a dictionary, not a film, at a fraction of the cost."""


DEFAULTS = {  # diffusers 0.42's own defaults for its pipeline classes, and where each puts cond and uncond
    "OrganismFluxPipeline": PipelineDefaults(20, 4.0, "batched"),
    "OrganismUNetPipeline": PipelineDefaults(20, 4.0, "batched"),
    "FluxPipeline": PipelineDefaults(28, 3.5, "none"),
    "StableDiffusionPipeline": PipelineDefaults(30, 7.5, "batched"),
    "StableDiffusionXLPipeline": PipelineDefaults(30, 6.0, "batched"),
    "StableDiffusion3Pipeline": PipelineDefaults(28, 7.0, "batched"),
    "Flux2Pipeline": PipelineDefaults(50, 4.0, "none"),
    "ChromaPipeline": PipelineDefaults(35, 5.0, "sequential"),
    "QwenImagePipeline": PipelineDefaults(50, 1.0, "none"),  # true CFG needs a negative prompt: not passed here
    "WanPipeline": PipelineDefaults(50, 5.0, "sequential", video=VideoSize(17, 480, 832)),
    "AuraFlowPipeline": PipelineDefaults(50, 3.5, "batched"),
    "HunyuanVideoPipeline": PipelineDefaults(50, 6.0, "none", video=VideoSize(17, 720, 1280)),
    "LTXPipeline": PipelineDefaults(50, 3.0, "batched", video=VideoSize(17, 512, 704)),
    "Lumina2Pipeline": PipelineDefaults(30, 4.0, "sequential"),
    "ZImagePipeline": PipelineDefaults(50, 5.0, "batched_cond_first", cfg_above=0.0),
    "HiDreamImagePipeline": PipelineDefaults(50, 5.0, "batched"),
}
FALLBACK = PipelineDefaults(30, 5.0, "batched")
LATENTS_BUILT_HERE = ("OrganismFluxPipeline", "OrganismUNetPipeline", "FluxPipeline", "StableDiffusionPipeline",
                      "StableDiffusionXLPipeline")
"""Pipelines whose starting noise :meth:`Runner.initial_noise` lays out; others get a seeded generator per sample."""


@dataclass
class Runner:
    """A loaded pipeline, its denoiser and how it runs guidance."""

    pipe: Any
    name: str

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer if hasattr(self.pipe, "transformer") else self.pipe.unet

    @property
    def kind(self) -> str:
        return type(self.pipe).__name__

    @property
    def is_organism(self) -> bool:
        return self.kind.startswith("Organism")

    def sites(self) -> list[Site]:
        return available_sites(self.denoiser)

    def site(self, name: Union[Site, str]) -> Site:
        """The model's site for ``name`` (either runtime's naming, or a dictionary's Site): see
        :func:`training.adapters.resolve_site`; SiteError listing the sites otherwise."""
        return resolve_site(self.denoiser, name)

    @property
    def is_video(self) -> bool:
        return DEFAULTS.get(self.kind, FALLBACK).video is not None

    def require_images(self, what: str) -> None:
        """Refuse, before any work, a command that reads pictures when this pipeline makes videos."""
        if self.is_video:
            raise InputError(f"{what} needs an image pipeline, and {self.name} is a video pipeline ({self.kind}); "
                             "capture and train work on it")

    def defaults(self) -> tuple[int, float]:
        spec = DEFAULTS.get(self.kind, FALLBACK)
        return spec.steps, spec.guidance

    def guidance_mode(self, guidance_scale: float) -> str:
        spec = DEFAULTS.get(self.kind, FALLBACK)
        return spec.cfg if guidance_scale > spec.cfg_above else "none"

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: Optional[int] = None,
                 guidance: Optional[float] = None, site_functions: Optional[Mapping[Site, SiteFunction]] = None,
                 latents: Optional[Tensor] = None) -> Tensor:
        """Images (B, C, H, W) in [0, 1] for ``prompts``, sample ``i`` from noise seeded ``seeds[i]``; from a
        video pipeline, frames (B, F, C, H, W) in [0, 1] of the size in its ``PipelineDefaults.video``."""
        default_steps, default_guidance = self.defaults()
        video = DEFAULTS.get(self.kind, FALLBACK).video
        size = {} if video is None else {"num_frames": video.frames, "height": video.height, "width": video.width}
        steps = steps or default_steps
        guidance = default_guidance if guidance is None else guidance
        state = SamplingState(self.pipe.scheduler, guidance=self.guidance_mode(guidance))
        noise: dict[str, Any] = {"latents": latents}
        if latents is None and self.kind in LATENTS_BUILT_HERE:
            noise["latents"] = torch.cat([self.initial_noise(seed) for seed in seeds])
        elif latents is None:
            noise = {"generator": [torch.Generator().manual_seed(int(seed)) for seed in seeds]}
        hooks = attach(self.denoiser, site_functions, context=state) if site_functions else nullcontext()
        with hooks:
            out = self.pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, **noise, **size,
                            output_type="pt", callback_on_step_end=state.on_step_end)
        pictures = out.frames if hasattr(out, "frames") else out.images  # video pipelines' outputs hold frames
        return pictures.float().clamp(0, 1)

    def load_image(self, path: Path) -> Tensor:
        """A picture as the organism's input: grey, 32x32, in [-1, 1], shape (1, 1, 32, 32)."""
        self._require_organism("capturing real images")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                grey = image.convert("L").resize((32, 32), Image.BILINEAR)
        except (OSError, UnidentifiedImageError) as err:
            raise InputError(f"{path} is not a readable image ({err})") from err
        return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 127.5 - 1.0)[None, None]

    def denoise_once(self, image: Tensor, prompt: str, progress: float, seed: int,
                     site_functions: Mapping[Site, SiteFunction]) -> None:
        """One denoiser pass on ``image`` noised to where a 20-step sampling stands at ``progress`` (0..1)."""
        self.denoise_batch(image, prompt, progress, [seed], site_functions)

    def denoise_batch(self, images: Tensor, prompt: str, progress: float, seeds: Sequence[int],
                      site_functions: Mapping[Site, SiteFunction]) -> None:
        """:meth:`denoise_once` for a batch (B, 1, 32, 32) in one denoiser call, image ``i`` noised from seed
        ``seeds[i]``: each image gets the noise it would get alone, so batching changes no activation."""
        self._require_organism("capturing real images")
        from organism.models import to_latent

        if len(seeds) != images.shape[0]:
            raise InputError(f"denoise_batch got {images.shape[0]} images and {len(seeds)} seeds: give one seed per image")
        pipe, scheduler = self.pipe, self.pipe.scheduler
        scheduler.set_timesteps(20)
        index = min(max(int(round(progress * (len(scheduler.timesteps) - 1))), 0), len(scheduler.timesteps) - 1)
        t = scheduler.timesteps[index]
        sigma = float(scheduler.sigmas[index])
        x0 = to_latent(images)
        noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=torch.Generator().manual_seed(int(seed)))
                           for seed in seeds])
        x = (1 - sigma) * x0 + sigma * noise if self.kind == "OrganismFluxPipeline" else x0 + sigma * noise
        encoded = shared_prompt_encoding(prompt)
        batch = x0.shape[0]
        tokens, pooled = encoded.tokens.expand(batch, -1, -1), encoded.pooled.expand(batch, -1)
        device = next(self.denoiser.parameters()).device
        context = {"sigma": sigma, "progress": index / max(len(scheduler.timesteps) - 1, 1), "cond": torch.ones(batch)}
        with torch.no_grad(), attach(self.denoiser, site_functions, context=lambda: context):
            pipe.predict(pipe.scale_model_input(x, t).to(device), t, tokens.to(device), pooled.to(device))

    def _require_organism(self, what: str) -> None:
        if not self.is_organism:
            raise InputError(f"{what} is implemented for the organism pipelines here; for SD / Flux checkpoints use "
                                  "the ComfyUI node 'Capture Activations from Images'")

    def initial_noise(self, seed: int) -> Tensor:
        """One sample's starting noise in the shape the pipeline takes ``latents`` in."""
        gen = torch.Generator().manual_seed(int(seed))
        if self.is_organism:
            from organism.models import LATENT_CHANNELS, LATENT_SIZE

            return torch.randn((1, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), generator=gen)
        pipe = self.pipe
        if self.kind == "FluxPipeline":
            channels = self.denoiser.config.in_channels // 4
            h = 2 * (pipe.default_sample_size // 2)
            return pipe._pack_latents(torch.randn((1, channels, h, h), generator=gen), 1, channels, h, h)
        # SD / SDXL pipelines scale given latents by the scheduler's init_noise_sigma themselves.
        size = self.denoiser.config.sample_size
        return torch.randn((1, self.denoiser.config.in_channels, size, size), generator=gen)


def shared_prompt_encoding(prompt: str):
    from organism.text import shared_encoder

    return shared_encoder()([prompt])


def _organism_folder(name: str) -> Path:
    from organism import WEIGHTS

    folder = WEIGHTS / name.split("-", 1)[1]
    if not (folder / "model_index.json").exists():
        raise InputError(f"the model organism's weights are missing from {folder}: run `python -m training organism` "
                              "to rebuild them, or restore them with git checkout")
    return folder


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or Path(model).suffix != ""


def check_model(model: str) -> Optional[Path]:
    """The local pipeline folder ``model`` names (None for a Hub id), checked without loading anything: an
    organism whose weights are there, or a folder whose model_index.json names a pipeline class; InputError
    otherwise, so that a command refuses a bad model before it does any work."""
    if model in ORGANISMS:
        folder = _organism_folder(model)
    else:
        folder = Path(os.path.expanduser(model))
        if not folder.exists():
            if _looks_like_path(model):
                raise InputError(f"no such folder: {model}")
            return None
    pipeline_class(folder)
    return folder


def pipeline_class(folder: Path) -> str:
    """The pipeline class that ``folder/model_index.json`` names; InputError when the file is missing, is not
    JSON, or names no pipeline this installation has."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise InputError(f"{folder} is not a diffusers pipeline folder (it has no model_index.json)")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{index} is not valid JSON ({' '.join(str(err).split())}): restore the pipeline "
                         "folder's model_index.json") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise InputError(f"{index} names no pipeline class: it needs \"_class_name\", e.g. \"FluxPipeline\"")
    if name not in _pipeline_classes():
        raise InputError(f"{index} names the pipeline class {name[:80]!r}, which neither diffusers nor the organism "
                         "has: is the folder from a newer diffusers, or is the name mistyped?")
    return name


def _pipeline_classes() -> set[str]:
    """Pipeline classes a folder may name: diffusers' (read from its lazy index, nothing imported) and the organism's."""
    import diffusers

    return {name for name in dir(diffusers) if "Pipeline" in name} | {
        name for name in DEFAULTS if name.startswith("Organism")}


def load_runner(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Runner:
    """The pipeline named ``model``: an organism name, a local folder or a Hub id (see module docstring)."""
    apply_torchvision_workaround()
    folder = check_model(model)
    pipe = _load(folder, model, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    runner = Runner(pipe, model)
    runner.sites()  # an unsupported denoiser class fails here, before any work
    return runner


def _load(folder: Optional[Path], model: str, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # our own bars say what is happening

    if folder is not None:
        class_name = pipeline_class(folder)
        try:
            if class_name.startswith("Organism"):
                from organism import pipelines

                return getattr(pipelines, class_name).from_pretrained(folder, dtype=dtype)
            return DiffusionPipeline.from_pretrained(folder, dtype=dtype)
        except Exception as err:  # missing or damaged components: one actionable message
            raise InputError(f"could not load the pipeline folder {folder} ({class_name}): {_first_line(err)}; "
                             "is a component folder missing or damaged?") from err
    try:
        return DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except Exception as err:  # offline misses, unknown repos, gated repos: one actionable message
        raise InputError(
            f"could not load the model {model!r}: {_first_line(err)}. Pass a local pipeline folder, a Hub id that is "
            f"in the local Hugging Face cache (or reachable), or one of {', '.join(ORGANISMS)}"
        ) from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
