"""Where a diffusers pipeline run stands, for the adapters' SiteContext.

Wiring (SD1.5 / SDXL pipelines batch classifier-free guidance as ``[uncond, cond]``)::

    state = SamplingState(pipe.scheduler, guidance="batched")
    with attach(pipe.unet, {site: fn}, context=state):
        pipe(prompt, guidance_scale=7.5, callback_on_step_end=state.on_step_end)

FluxPipeline (diffusers 0.42): one transformer call per step ("none", guidance-distilled); with
``true_cfg_scale > 1`` and a negative prompt it calls the transformer twice per step, cond first, then
uncond, each with the whole batch ("sequential"; so do Chroma, Wan, Lumina 2 and Qwen-Image's true CFG).
SD3, AuraFlow, LTX-Video and HiDream batch [uncond, cond] ("batched"); Z-Image batches [cond, uncond]
("batched_cond_first").

Sigma comes from each call's timestep and the schedule from the scheduler; ``call_context`` places
one in the other (``sae_core.timesteps.schedule_progress``), not by counting calls, so progress is right for samplers
that evaluate the model mid-step (Heun, DPM2) and from the very first call, before any callback.
The callback keeps ``step`` / ``num_steps``, resets the per-step call count that "sequential" uses,
and checks the declared guidance against the pipeline's own flag where it has one.
A model called directly with no state gets progress None (see ``base.ContextLike``): a progress window
then raises ``ScheduleError``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from sae_core import ConfigError, schedule_progress, ScheduleError

from .base import ModelCall

GUIDANCE = ("none", "batched", "batched_cond_first", "sequential")


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

    ``guidance``: "none" (every row is the prompt's), "batched" (rows are [uncond, cond] halves),
    "batched_cond_first" ([cond, uncond]) or "sequential" (calls alternate cond, uncond within a step). Use one state per pipeline run, or
    let a run finish: its last callback makes the state ready for the next one.
    """

    def __init__(self, scheduler: Any = None, guidance: str = "none"):
        if guidance not in GUIDANCE:
            raise ConfigError(f"guidance must be one of {', '.join(GUIDANCE)}, got {guidance!r}")
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

    def context_values(self, call: ModelCall) -> Mapping[str, Any]:
        """Sigma, schedule and prompt rows of this call, for :func:`sae_core.sites.call_context`."""
        flow = call.sigma is not None
        sigma = call.sigma if flow else _first(ddpm_sigmas(call.timestep, self.scheduler))
        schedule = self._schedule(flow)
        self.timestep, self.sigma = call.timestep, sigma
        self.progress = schedule_progress(sigma, schedule)
        cond = self._cond(call.batch)
        self._calls_in_step += 1
        return {"sigma": sigma, "schedule": schedule, "cond": cond}

    def _schedule(self, flow: bool) -> Any:
        """The scheduler's current schedule as sigmas (the same conversion as the calls' sigmas)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None:
            return None
        return getattr(self.scheduler, "sigmas", None) if flow else ddpm_sigmas(timesteps, self.scheduler)

    def _cond(self, batch: int) -> Tensor:
        if self.guidance in ("batched", "batched_cond_first"):
            if batch % 2:
                raise ConfigError(f"guidance={self.guidance!r} expects cond and uncond halves, but the model got "
                                      f"{batch} rows; use guidance='none' for a run without CFG")
            second = torch.arange(batch) >= batch // 2
            return second if self.guidance == "batched" else ~second
        if self.guidance == "sequential":
            return torch.full((batch,), self._calls_in_step % 2 == 0)
        return torch.ones(batch, dtype=torch.bool)

    def _check_guidance(self, pipe: Any) -> None:
        cfg = getattr(pipe, "do_classifier_free_guidance", None)  # SD / SDXL / SD3 / Wan / ...; Flux has none
        if cfg is not None and bool(cfg) != (self.guidance != "none"):
            expected = "the pipeline's CFG layout (batched, batched_cond_first or sequential)" if cfg else "'none'"
            raise ConfigError(f"the pipeline {'runs' if cfg else 'does not run'} classifier-free guidance "
                                  f"but the SamplingState says guidance={self.guidance!r}: use {expected}")


def _first(values: Optional[np.ndarray]) -> Optional[float]:
    return None if values is None else float(values[0])
