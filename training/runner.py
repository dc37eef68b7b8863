"""A text-to-image pipeline behind one call: load it by name, generate with site functions attached.

``load_runner("organism-flux")`` (the committed model organism), a local pipeline folder, or a Hugging
Face Hub id (Flux, SD 1.5, SDXL; read from the local cache when offline). ``Runner.generate`` runs the
pipeline with :func:`training.adapters.attach` and a :class:`~training.adapters.SamplingState`, so site
functions see sigma, progress and which rows are the prompt's, whatever the pipeline.
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from sae_core.errors import DictionaryError
from sae_core.intervention import SiteFunction
from sae_core.site import Site

from .adapters import SamplingState, adapter_for, attach
from .compat import apply_torchvision_workaround

log = logging.getLogger("training.runner")
ORGANISMS = ("organism-flux", "organism-unet")
DEFAULTS = {  # steps, guidance: what each kind of pipeline is sampled with unless told otherwise
    "OrganismFluxPipeline": (20, 4.0), "OrganismUNetPipeline": (20, 4.0),
    "FluxPipeline": (28, 3.5), "StableDiffusionPipeline": (30, 7.5), "StableDiffusionXLPipeline": (30, 6.0),
}


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
        return adapter_for(self.denoiser).available_sites(self.denoiser)

    def site(self, name: str) -> Site:
        """The model's site called ``name`` ("double_blocks.1:image"); a clear error listing them otherwise."""
        sites = self.sites()
        for site in sites:
            if site.name == name:
                return site
        raise DictionaryError(f"{self.name} has no site {name!r}; it has: " + ", ".join(s.name for s in sites))

    def defaults(self) -> tuple[int, float]:
        return DEFAULTS.get(self.kind, (30, 5.0))

    def guidance_mode(self, guidance_scale: float) -> str:
        if self.kind == "FluxPipeline":
            return "none"  # guidance-distilled: one call per step
        return "batched" if guidance_scale > 1 else "none"

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: Optional[int] = None,
                 guidance: Optional[float] = None, site_functions: Optional[Mapping[Site, SiteFunction]] = None,
                 latents: Optional[Tensor] = None) -> Tensor:
        """Images (B, C, H, W) in [0, 1] for ``prompts``, sample ``i`` from noise seeded ``seeds[i]``."""
        default_steps, default_guidance = self.defaults()
        steps = steps or default_steps
        guidance = default_guidance if guidance is None else guidance
        state = SamplingState(self.pipe.scheduler, guidance=self.guidance_mode(guidance))
        if latents is None:
            latents = torch.cat([self.initial_noise(seed) for seed in seeds])
        hooks = attach(self.denoiser, site_functions, context=state) if site_functions else nullcontext()
        with hooks:
            out = self.pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                            output_type="pt", callback_on_step_end=state.on_step_end)
        return out.images.float().clamp(0, 1)

    def load_image(self, path: Path) -> Tensor:
        """A picture as the organism's input: grey, 32x32, in [-1, 1], shape (1, 1, 32, 32)."""
        self._require_organism("capturing real images")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                grey = image.convert("L").resize((32, 32), Image.BILINEAR)
        except (OSError, UnidentifiedImageError) as err:
            raise DictionaryError(f"{path} is not a readable image ({err})") from err
        return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 127.5 - 1.0)[None, None]

    def denoise_once(self, image: Tensor, prompt: str, progress: float, seed: int,
                     site_functions: Mapping[Site, SiteFunction]) -> None:
        """One denoiser pass on ``image`` noised to where a 20-step sampling stands at ``progress`` (0..1)."""
        self._require_organism("capturing real images")
        from .organism.models import to_latent

        pipe, scheduler = self.pipe, self.pipe.scheduler
        scheduler.set_timesteps(20)
        index = min(max(int(round(progress * (len(scheduler.timesteps) - 1))), 0), len(scheduler.timesteps) - 1)
        t = scheduler.timesteps[index]
        sigma = float(scheduler.sigmas[index])
        x0 = to_latent(image)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed)))
        x = (1 - sigma) * x0 + sigma * noise if self.kind == "OrganismFluxPipeline" else x0 + sigma * noise
        encoded = shared_prompt_encoding(prompt)
        device = next(self.denoiser.parameters()).device
        context = {"sigma": sigma, "progress": index / max(len(scheduler.timesteps) - 1, 1), "cond": torch.ones(1)}
        with torch.no_grad(), attach(self.denoiser, site_functions, context=lambda: context):
            pipe.predict(pipe.scale_model_input(x, t).to(device), t, encoded.tokens.to(device), encoded.pooled.to(device))

    def _require_organism(self, what: str) -> None:
        if not self.is_organism:
            raise DictionaryError(f"{what} is implemented for the organism pipelines here; for SD / Flux checkpoints use "
                                  "the ComfyUI node 'Capture Activations from Images'")

    def initial_noise(self, seed: int) -> Tensor:
        """One sample's starting noise in the shape the pipeline takes ``latents`` in."""
        gen = torch.Generator().manual_seed(int(seed))
        if self.is_organism:
            from .organism.models import LATENT_CHANNELS, LATENT_SIZE

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
    from .organism.text import shared_encoder

    return shared_encoder()([prompt])


def _organism_folder(name: str) -> Path:
    from .organism.build import WEIGHTS

    folder = WEIGHTS / name.split("-", 1)[1]
    if not (folder / "model_index.json").exists():
        raise DictionaryError(f"the model organism's weights are missing from {folder}: run `python -m training organism` "
                              "to rebuild them, or restore them with git checkout")
    return folder


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or Path(model).suffix != ""


def load_runner(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Runner:
    """The pipeline named ``model``: an organism name, a local folder or a Hub id (see module docstring)."""
    apply_torchvision_workaround()
    folder: Optional[Path] = None
    if model in ORGANISMS:
        folder = _organism_folder(model)
    elif Path(model).expanduser().exists():
        folder = Path(model).expanduser()
        if not (folder / "model_index.json").exists():
            raise DictionaryError(f"{folder} is not a diffusers pipeline folder (it has no model_index.json)")
    elif _looks_like_path(model):
        raise DictionaryError(f"no such folder: {model}")
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
        class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
        if class_name.startswith("Organism"):
            from .organism import pipelines

            return getattr(pipelines, class_name).from_pretrained(folder, dtype=dtype)
        return DiffusionPipeline.from_pretrained(folder, dtype=dtype)
    try:
        return DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except Exception as err:  # offline misses, unknown repos, gated repos: one actionable message
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DictionaryError(
            f"could not load the model {model!r}: {reason}. Pass a local pipeline folder, a Hub id that is in the "
            f"local Hugging Face cache (or reachable), or one of {', '.join(ORGANISMS)}"
        ) from err
