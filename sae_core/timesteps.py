"""When does a site function act? Gating edits by noise level.

A diffusion sampler calls the model once or more per step, at noise levels
(sigmas) taken from a schedule that decreases to 0. Whether an edit belongs to
the "early, composition" part of sampling or the "late, detail" part is a
property of the noise level, not of how many times the model has been called:
Heun and DPM-2 call the model twice per step, ancestral and restart samplers
revisit noise levels, and ComfyUI may run cond and uncond in separate calls.
A call counter therefore drifts; the sigma does not. Everything here gates by
sigma:

* :func:`schedule_progress` turns the current sigma into a position in the
  sampler's schedule, 0 at the first step and 1 at the last. Adapters compute
  it once per call and put it in :attr:`SiteContext.progress`. A sigma between
  two schedule entries (a sampler's mid-step evaluation) gets an interpolated
  position, so the result is exact for any sampler.
* :func:`in_window` asks whether a context lies in a progress window and/or a
  sigma range (both inclusive).

When the context cannot answer the question a restricting gate never guesses:
a progress window with no schedule to place the step in (a user's own sampling
loop) is a :class:`ScheduleError` that says to use a sigma range instead, since
silently never (or always) acting would both be wrong; a sigma range with no
sigma stays closed. A gate that restricts nothing (window ``(0, 1)``, sigma
range ``(0, inf)``, or ``None``) is open regardless.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence, Union

from torch import Tensor

from .errors import ScheduleError

if TYPE_CHECKING:
    from .sites.context import SiteContext

Window = tuple[float, float]
_SAME_SIGMA = 1e-5  # relative tolerance: float32 round trips of a schedule entry are still that entry
_EDGE = 1e-9  # slack on inclusive window bounds for float rounding


def _schedule_list(sample_sigmas: Union[Sequence[float], Tensor]) -> list[float]:
    if isinstance(sample_sigmas, Tensor):
        return [float(s) for s in sample_sigmas.detach().reshape(-1).cpu().tolist()]
    return [float(s) for s in sample_sigmas]


def _model_sigmas(sample_sigmas: Union[Sequence[float], Tensor]) -> list[float]:
    """Sigmas at which the model is evaluated: ComfyUI appends a final 0 that is the
    sampler's destination, never a model input, so it is not a step."""
    sigmas = _schedule_list(sample_sigmas)
    if len(sigmas) > 1 and sigmas[-1] == 0.0:
        sigmas = sigmas[:-1]
    return sigmas


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_SAME_SIGMA, abs_tol=1e-12)


def _between(x: float, a: float, b: float) -> bool:
    return min(a, b) <= x <= max(a, b)


def schedule_progress(
    sigma: Optional[float], sample_sigmas: Union[Sequence[float], Tensor, None]
) -> Optional[float]:
    """Position of ``sigma`` in the sampler's schedule: 0 at the first step, 1 at the last.

    ``sample_sigmas`` is the schedule as the sampler holds it (ComfyUI's
    ``transformer_options["sample_sigmas"]``, ending in 0, or diffusers'
    ``scheduler.sigmas``); a final 0 is dropped, so ``[s0, s1, s2, 0]`` has three
    steps with progress 0, 0.5 and 1. A sigma between two entries is
    interpolated linearly between their positions (mid-step evaluations); one
    outside the schedule takes the position of the nearest entry. A one-step
    schedule is at progress 0. Returns None when either argument is None or the
    schedule is empty.
    """
    if sigma is None or sample_sigmas is None:
        return None
    sigmas = _model_sigmas(sample_sigmas)
    if not sigmas:
        return None
    if len(sigmas) == 1:
        return 0.0
    sigma = float(sigma)
    last = len(sigmas) - 1
    nearest = min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - sigma))
    if _same(sigmas[nearest], sigma):
        return nearest / last
    for lo in (nearest, nearest - 1):  # the interval after the nearest entry, then the one before
        hi = lo + 1
        if 0 <= lo and hi <= last and _between(sigma, sigmas[lo], sigmas[hi]):
            fraction = (sigmas[lo] - sigma) / (sigmas[lo] - sigmas[hi])
            return (lo + fraction) / last
    return nearest / last


def validate_window(window: Optional[Sequence[float]]) -> Optional[Window]:
    """Check a progress window ``(start, end)``, inclusive, in [0, 1]; return it as floats."""
    if window is None:
        return None
    values = tuple(float(v) for v in window)
    if len(values) != 2:
        raise ScheduleError(f"a window is (start, end) in sampling progress 0..1, got {window!r}")
    start, end = values
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ScheduleError(
            f"window ({start:g}, {end:g}) must lie within [0, 1] (0 = first step, 1 = last step); rescale it"
        )
    if start > end:
        raise ScheduleError(f"window starts after it ends ({start:g} > {end:g}): swap start and end")
    return start, end


def validate_sigma_range(sigma_range: Optional[Sequence[float]]) -> Optional[Window]:
    """Check a noise-level range ``(low, high)``, inclusive, with ``0 <= low <= high``."""
    if sigma_range is None:
        return None
    values = tuple(float(v) for v in sigma_range)
    if len(values) != 2:
        raise ScheduleError(f"a sigma range is (low, high), got {sigma_range!r}")
    low, high = values
    if math.isnan(low) or math.isnan(high) or low < 0:
        raise ScheduleError(f"sigma range ({low:g}, {high:g}) must have 0 <= low; sigmas are noise levels")
    if low > high:
        raise ScheduleError(f"sigma range starts above its end ({low:g} > {high:g}): swap low and high")
    return low, high


def _window_restricts(window: Window) -> bool:
    return window[0] > 0.0 or window[1] < 1.0


def _range_restricts(sigma_range: Window) -> bool:
    return sigma_range[0] > 0.0 or sigma_range[1] < math.inf


def in_window(
    ctx: SiteContext,
    window: Optional[Window] = None,
    sigma_range: Optional[Window] = None,
) -> bool:
    """Whether a site function should act in ``ctx``.

    ``window``: inclusive progress bounds (see :func:`schedule_progress`);
    ``sigma_range``: inclusive noise-level bounds. Both must hold; None means
    no restriction. A restricting window in a context without progress raises
    :class:`ScheduleError`; a restricting range in a context without sigma is
    False (the edit does not run rather than run at the wrong time).
    """
    if window is not None and _window_restricts(window):
        if ctx.progress is None:
            raise ScheduleError(
                f"a timestep window ({window[0]:g}, {window[1]:g}) needs the sampler's schedule, and this sampling "
                "loop gives none (sigma " + ("unknown" if ctx.sigma is None else f"{ctx.sigma:g}") + "); "
                "use a sigma range instead, or pass the schedule in the context")
        if not window[0] - _EDGE <= ctx.progress <= window[1] + _EDGE:
            return False
    if sigma_range is not None and _range_restricts(sigma_range):
        if ctx.sigma is None:
            return False
        sigma = float(ctx.sigma)
        low, high = sigma_range
        if not (low <= sigma <= high or _same(sigma, low) or _same(sigma, high)):
            return False
    return True

