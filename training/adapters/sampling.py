"""Where a diffusers pipeline run stands, for the adapters' SiteContext.

Wiring (SD1.5 / SDXL pipelines batch classifier-free guidance as ``[uncond, cond]``)::

    state = SamplingState(pipe.scheduler, guidance="batched")
    with attach(pipe.unet, {site: fn}, context=state):
        pipe(prompt, guidance_scale=7.5, callback_on_step_end=state.on_step_end)

FluxPipeline (diffusers 0.42): one transformer call per step ("none", guidance-distilled); with
``true_cfg_scale > 1`` and a negative prompt it calls the transformer twice per step, cond first, then
uncond, each with the whole batch ("sequential").

Sigma and progress come from each call's timestep and the scheduler's current schedule
(``sae_core.timesteps.schedule_progress``), not from counting calls, so they are right for samplers
that evaluate the model mid-step (Heun, DPM2) and from the very first call, before any callback.
The callback keeps ``step`` / ``num_steps``, resets the per-step call count that "sequential" uses,
and checks the declared guidance against the pipeline's own flag where it has one.
A model called directly with no state gets progress None (see ``base.ContextLike``).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from sae_core.errors import DictionaryError
from sae_core.timesteps import schedule_progress

from .base import CallContext, ModelCall

GUIDANCE = ("none", "batched", "sequential")


def ddpm_sigmas(timesteps: Any, scheduler: Any) -> Optional[np.ndarray]:
    """sqrt((1 - alpha_bar) / alpha_bar) at DDPM timesteps, interpolated linearly between integer
    timesteps as EulerDiscreteScheduler does; None when the scheduler has no ``alphas_cumprod``."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None or timesteps is None:
        return None
    alphas = torch.as_tensor(alphas).double().cpu()
    train = ((1 - alphas) / alphas).sqrt().numpy()
    t = torch.as_tensor(timesteps).double().cpu().reshape(-1).numpy()
    return np.interp(t, np.arange(len(train)), train)


class SamplingState:
    """A :class:`~training.adapters.base.ContextSource` fed by the model's calls and the pipeline's callback.

    ``guidance``: "none" (every row is the prompt's), "batched" (rows are [uncond, cond] halves) or
    "sequential" (calls alternate cond, uncond within a step). Use one state per pipeline run, or
    let a run finish: its last callback makes the state ready for the next one.
    """

    def __init__(self, scheduler: Any = None, guidance: str = "none"):
        if guidance not in GUIDANCE:
            raise DictionaryError(f"guidance must be one of {', '.join(GUIDANCE)}, got {guidance!r}")
        self.scheduler, self.guidance = scheduler, guidance
        self.step = 0
        """Index of the step under way (advanced by :meth:`on_step_end`)."""
        self.num_steps: Optional[int] = None
        """Steps of the running pipeline call, known from the first callback on."""
        self.timestep: Optional[float] = None
        self.sigma: Optional[float] = None
        self.progress: Optional[float] = None
        self._calls_in_step = 0

    def on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """diffusers' ``callback_on_step_end``: step ``step`` is done. Returns ``callback_kwargs`` as is."""
        self._check_guidance(pipe)
        self.num_steps = int(pipe.num_timesteps)
        self.step = step + 1 if step + 1 < self.num_steps else 0
        self._calls_in_step = 0
        return callback_kwargs

    def call_context(self, call: ModelCall) -> CallContext:
        flow = call.sigma is not None
        sigma = call.sigma if flow else _first(ddpm_sigmas(call.timestep, self.scheduler))
        self.timestep, self.sigma = call.timestep, sigma
        self.progress = schedule_progress(sigma, self._schedule(flow))
        cond = self._cond(call.batch)
        self._calls_in_step += 1
        return CallContext(sigma=sigma, progress=self.progress, cond=cond)

    def _schedule(self, flow: bool) -> Any:
        """The scheduler's current schedule as sigmas (the same conversion as the calls' sigmas)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None:
            return None
        return getattr(self.scheduler, "sigmas", None) if flow else ddpm_sigmas(timesteps, self.scheduler)

    def _cond(self, batch: int) -> Tensor:
        if self.guidance == "batched":
            if batch % 2:
                raise DictionaryError(f"guidance='batched' expects [uncond, cond] halves, but the model got "
                                      f"{batch} rows; use guidance='none' for a run without CFG")
            return torch.arange(batch) >= batch // 2
        if self.guidance == "sequential":
            return torch.full((batch,), self._calls_in_step % 2 == 0)
        return torch.ones(batch, dtype=torch.bool)

    def _check_guidance(self, pipe: Any) -> None:
        cfg = getattr(pipe, "do_classifier_free_guidance", None)  # SD / SDXL pipelines; Flux has none
        if cfg is not None and bool(cfg) != (self.guidance == "batched"):
            expected = "batched" if cfg else "none"
            raise DictionaryError(f"the pipeline {'runs' if cfg else 'does not run'} classifier-free guidance "
                                  f"but the SamplingState says guidance={self.guidance!r}: use {expected!r}")


def _first(values: Optional[np.ndarray]) -> Optional[float]:
    return None if values is None else float(values[0])
