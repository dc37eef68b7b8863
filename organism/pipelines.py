"""The organisms as ordinary diffusers pipelines: ``save_pretrained`` / ``from_pretrained`` folders,
``pipe(prompt, num_inference_steps=..., guidance_scale=..., callback_on_step_end=...)``.

Classifier-free guidance runs batched, rows ``[uncond, cond]`` (as in SD pipelines), with the empty
prompt as the unconditional input; ``do_classifier_free_guidance`` and ``num_timesteps`` are there for
:class:`training.adapters.SamplingState`. The sentence encoder is not a pipeline component (it ships in
its own package, see :mod:`.text`), so a saved organism is a few MB.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .compat import apply_torchvision_workaround
from .models import LATENT_CHANNELS, LATENT_SIZE, flux_velocity, from_latent, pack, unpack
from .text import shared_encoder

apply_torchvision_workaround()
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput  # noqa: E402

Prompt = Union[str, list[str]]


def images_to_output(images: Tensor, output_type: str) -> Any:
    """(B, 1, 32, 32) in [-1, 1] -> "pt": (B, 1, 32, 32) in [0, 1]; "np": (B, 32, 32, 1); "pil": L images."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    if output_type == "pt":
        return x.cpu()
    if output_type == "np":
        return x.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "pil":
        from PIL import Image

        arrays = (x[:, 0] * 255).round().byte().cpu().numpy()
        return [Image.fromarray(a, mode="L") for a in arrays]
    raise ValueError(f"output_type must be pt, np, pil or latent, got {output_type!r}")


class _OrganismPipeline(DiffusionPipeline):
    """Sampling shared by both organisms; subclasses say how the denoiser predicts."""

    _guidance_scale = 1.0
    _num_timesteps = 0

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    def predict(self, latents: Tensor, t: Tensor, tokens: Tensor, pooled: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompt,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: Optional[torch.Generator] = None,
        latents: Optional[Tensor] = None,
        output_type: str = "pil",
        callback_on_step_end: Optional[Callable[..., dict]] = None,
        return_dict: bool = True,
    ) -> Any:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        device = next(self.denoiser.parameters()).device
        dtype = next(self.denoiser.parameters()).dtype
        self._guidance_scale = float(guidance_scale)
        encoder = shared_encoder()
        encoded = encoder(([""] * len(prompts) if self.do_classifier_free_guidance else []) + prompts)
        tokens, pooled = encoded.tokens.to(device, dtype), encoded.pooled.to(device, dtype)
        if latents is None:
            shape = (len(prompts), LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        latents = latents.to(device, torch.float32) * self.init_noise_sigma()
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([latents, latents]) if self.do_classifier_free_guidance else latents
            model_in = self.scale_model_input(model_in, t)
            pred = self.predict(model_in.to(dtype), t, tokens, pooled).float()
            if self.do_classifier_free_guidance:
                uncond, cond = pred.chunk(2)
                pred = uncond + self._guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                latents = returned.get("latents", latents)
        if output_type == "latent":
            images: Any = latents
        else:
            images = images_to_output(from_latent(latents), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def init_noise_sigma(self) -> float:
        return float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def scale_model_input(self, x: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x


class OrganismFluxPipeline(_OrganismPipeline):
    """The Flux-architecture organism: ``FluxTransformer2DModel`` + ``FlowMatchEulerDiscreteScheduler``."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def predict(self, latents: Tensor, t: Tensor, tokens: Tensor, pooled: Tensor) -> Tensor:
        sigma = (t / 1000).expand(latents.shape[0]).to(latents.dtype)  # as FluxPipeline passes it
        return unpack(flux_velocity(self.transformer, pack(latents), sigma, tokens, pooled))


class OrganismUNetPipeline(_OrganismPipeline):
    """The SD-style organism: ``UNet2DConditionModel`` (epsilon) + ``EulerDiscreteScheduler``."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def predict(self, latents: Tensor, t: Tensor, tokens: Tensor, pooled: Tensor) -> Tensor:
        return self.unet(latents, t, encoder_hidden_states=tokens, return_dict=False)[0]


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def unet_scheduler():
    from diffusers import EulerDiscreteScheduler

    from .models import DDPM_CONFIG

    return EulerDiscreteScheduler(**DDPM_CONFIG, timestep_spacing="trailing")
