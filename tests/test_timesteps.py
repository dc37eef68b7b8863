"""Gating by noise level: where a sigma sits in the schedule, and whether a window is open."""
import math

import pytest
import torch

from sae_core.errors import ScheduleError
from sae_core.sites import SiteContext
from sae_core.timesteps import in_window, schedule_progress, validate_sigma_range, validate_window

SCHEDULE = [14.6, 7.0, 3.0, 1.0, 0.3]


def ctx(sigma=None, progress=None):
    return SiteContext(sigma=sigma, progress=progress, cond=None, grid=None)


def test_each_schedule_entry_gets_its_step_position():
    assert [schedule_progress(s, SCHEDULE) for s in SCHEDULE] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_final_zero_is_the_destination_not_a_step():
    comfy = torch.tensor(SCHEDULE + [0.0])  # ComfyUI appends sigma 0
    assert [schedule_progress(s, comfy) for s in SCHEDULE] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_float32_round_trip_of_an_entry_is_still_that_entry():
    sigmas = torch.tensor([1.0, 0.7071, 0.3333, 0.0], dtype=torch.float32)
    assert schedule_progress(float(sigmas[1].double()), [1.0, 0.7071, 0.3333, 0.0]) == 0.5


def test_a_sigma_between_entries_is_interpolated():
    assert schedule_progress(5.0, SCHEDULE) == pytest.approx(0.25 + 0.25 * (7.0 - 5.0) / (7.0 - 3.0))
    assert schedule_progress(0.65, SCHEDULE) == pytest.approx(0.875)


def test_a_sigma_outside_the_schedule_takes_the_nearest_end():
    assert schedule_progress(100.0, SCHEDULE) == 0.0
    assert schedule_progress(0.01, SCHEDULE + [0.0]) == 1.0


def test_one_step_schedules_are_at_progress_zero_and_missing_ones_are_unknown():
    assert schedule_progress(1.0, [1.0, 0.0]) == 0.0
    assert schedule_progress(1.0, None) is None
    assert schedule_progress(None, SCHEDULE) is None
    assert schedule_progress(1.0, []) is None


def test_windows_are_inclusive_at_both_ends():
    assert in_window(ctx(progress=0.25), window=(0.25, 0.5))
    assert in_window(ctx(progress=0.5), window=(0.25, 0.5))
    assert not in_window(ctx(progress=0.75), window=(0.25, 0.5))
    assert not in_window(ctx(progress=0.0), window=(0.25, 0.5))


def test_progress_from_the_schedule_lands_inside_a_window_ending_on_that_step():
    p = schedule_progress(3.0, SCHEDULE + [0.0])
    assert in_window(ctx(sigma=3.0, progress=p), window=(0.0, 0.5))


def test_sigma_ranges_are_inclusive():
    assert in_window(ctx(sigma=1.0), sigma_range=(1.0, 3.0))
    assert in_window(ctx(sigma=3.0), sigma_range=(1.0, 3.0))
    assert not in_window(ctx(sigma=3.5), sigma_range=(1.0, 3.0))
    assert not in_window(ctx(sigma=0.5), sigma_range=(1.0, 3.0))


def test_window_and_sigma_range_must_both_hold():
    c = ctx(sigma=2.0, progress=0.6)
    assert in_window(c, window=(0.5, 1.0), sigma_range=(1.0, 3.0))
    assert not in_window(c, window=(0.0, 0.5), sigma_range=(1.0, 3.0))
    assert not in_window(c, window=(0.5, 1.0), sigma_range=(2.5, 3.0))


def test_no_restriction_is_always_open_even_without_context():
    assert in_window(ctx())
    assert in_window(ctx(), window=(0.0, 1.0), sigma_range=(0.0, math.inf))


def test_a_progress_window_without_a_schedule_is_an_error_that_names_the_fix():
    with pytest.raises(ScheduleError, match="use a sigma range instead"):
        in_window(ctx(sigma=1.0), window=(0.0, 0.5))


def test_a_sigma_range_without_a_sigma_stays_closed():
    assert not in_window(ctx(progress=0.1), sigma_range=(0.5, 2.0))


@pytest.mark.parametrize("window, message", [
    ((0.6, 0.2), "starts after it ends"),
    ((-0.1, 0.5), "within \\[0, 1\\]"),
    ((0.2, 1.5), "within \\[0, 1\\]"),
    ((0.2,), "\\(start, end\\)"),
])
def test_invalid_windows_are_refused_with_the_fix(window, message):
    with pytest.raises(ScheduleError, match=message):
        validate_window(window)


def test_valid_windows_come_back_as_float_pairs():
    assert validate_window([0, 1]) == (0.0, 1.0)
    assert validate_window(None) is None


def test_invalid_sigma_ranges_are_refused():
    with pytest.raises(ScheduleError, match="swap low and high"):
        validate_sigma_range((3.0, 1.0))
    with pytest.raises(ScheduleError, match="0 <= low"):
        validate_sigma_range((-1.0, 1.0))
