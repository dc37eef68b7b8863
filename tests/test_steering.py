"""Steering: what each edit does to the activations, and when it leaves them alone.

The dictionary is built by hand so that the answers are exact: its 32
features are +e_i and -e_i of a 16-d space (tied encoder, no biases), behind a
standardiser with mean 0.1 and std 2, so model-space directions are 2 e_i and
a feature's activation is the normalised coordinate. Feature 0 dominates every
token, so clamping it high leaves the other selections, hence the
reconstruction error, unchanged.
"""
import dataclasses
import pytest
import torch

from sae_core.errors import DictionaryError, ScheduleError, SteerError
from sae_core.sites import SiteContext
from sae_core.normalize import Standardizer
from sae_core.sae import SparseAutoencoder
from sae_core.steering import (
    Steer,
    ablate_features,
    add_direction,
    add_features,
    clamp_features,
    diff_of_means_direction,
    feature_activations,
    mean_token_norm,
    steer_function,
    swap_features,
)
from sae_core.timesteps import schedule_progress

D, M, K = 16, 32, 4
GRID = (2, 3)
SCHEDULE = [10.0, 5.0, 2.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def sae():
    standardizer = Standardizer(D, mean=torch.full((D,), 0.1), std=torch.full((D,), 2.0))
    sae = SparseAutoencoder(D, M, K, standardizer=standardizer)
    basis = torch.cat([torch.eye(D), -torch.eye(D)])
    with torch.no_grad():
        sae.W_dec.copy_(basis)
        sae.W_enc.copy_(basis)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.mean_activation.copy_(torch.linspace(0.5, 2.0, M))
    return sae


@pytest.fixture
def h():
    gen = torch.Generator().manual_seed(0)
    x = 0.1 + 0.5 * torch.randn(2, GRID[0] * GRID[1], D, generator=gen)
    x[..., 0] = 6.0  # feature 0 fires strongly on every token
    return x


def context(sigma=10.0, cond=(True, False), grid=GRID):
    return SiteContext(sigma=sigma, progress=schedule_progress(sigma, SCHEDULE),
                       cond=torch.tensor(cond) if cond is not None else None, grid=grid)


def activation(sae, x, feature):
    return feature_activations(x, sae, [feature])[..., 0]


def residual(sae, x):
    return x - sae.decode(sae.encode(x))


# ----------------------------------------------------------------------------- the operations


def test_zero_strength_add_returns_the_input_itself(sae, h):
    assert add_features(h, sae, [3, 5], 0.0) is h
    fn = steer_function(sae, [Steer((3,), (0.0,))])
    out = fn(h, context())
    assert out is h
    assert torch.equal(out, h)


def test_token_norm_add_moves_the_projection_on_the_unit_direction_by_strength_times_mean_norm(sae, h):
    unit = sae.direction(3, unit=True)
    out = add_features(h, sae, [3], 0.8, units="token_norm")
    moved = (out - h) @ unit  # (batch, tokens)
    expected = 0.8 * mean_token_norm(h)
    assert torch.allclose(moved, expected[:, None].expand_as(moved), atol=1e-5)
    assert torch.allclose(out - h, moved[..., None] * unit, atol=1e-5)  # nothing off the direction


def test_mean_activation_and_raw_units_scale_the_model_space_direction(sae, h):
    out = add_features(h, sae, [3], 10.0, units="mean_activation")
    assert torch.allclose(out - h, (10.0 * sae.mean_activation[3] * sae.direction(3)).expand_as(h), atol=1e-5)
    out = add_features(h, sae, [3, 4], (1.0, -2.0), units="raw")
    assert torch.allclose(out - h, (sae.direction(3) - 2.0 * sae.direction(4)).expand_as(h), atol=1e-5)


def test_clamp_sets_the_activation_and_keeps_the_reconstruction_error(sae, h):
    out = clamp_features(h, sae, [0], 6.0)
    assert torch.allclose(activation(sae, out, 0), torch.full((2, 6), 6.0), atol=1e-5)
    assert torch.allclose(residual(sae, out), residual(sae, h), atol=1e-5)
    assert torch.allclose(out[..., 1:], h[..., 1:])  # only the feature's own direction moved


def test_clamp_is_encode_edit_decode_plus_the_error(sae, h):
    codes = sae.encode(h)
    edited_values = torch.where(codes.indices == 0, torch.full_like(codes.values, 4.0), codes.values)
    decoded = sae.decode(type(codes)(edited_values, codes.indices))
    assert torch.allclose(clamp_features(h, sae, [0], 4.0), decoded + residual(sae, h), atol=1e-5)


def test_ablate_removes_the_feature(sae, h):
    assert float(activation(sae, h, 0).min()) > 2.0
    out = ablate_features(h, sae, [0])
    assert torch.allclose(activation(sae, out, 0), torch.zeros(2, 6), atol=1e-6)


def test_swap_moves_the_source_activation_onto_the_target(sae, h):
    a_src = activation(sae, h, 0)
    out = swap_features(h, sae, source=0, target=5)
    expected = a_src[..., None] * (sae.direction(5) - sae.direction(0))
    assert torch.allclose(out - h, expected, atol=1e-5)
    assert torch.allclose(activation(sae, out, 0), torch.zeros(2, 6), atol=1e-5)


def test_edits_do_not_touch_the_input_and_keep_its_dtype(sae, h):
    x = h.to(torch.bfloat16)
    before = x.clone()
    out = steer_function(sae, [Steer((0,), (2.0,), mode="clamp", units="raw", cond_only=False)])(x, context())
    assert out.dtype == torch.bfloat16
    assert torch.equal(x, before)
    assert not torch.equal(out, x)


def test_diff_of_means_is_the_baseline_direction(h):
    red, blue = h[0], h[1]
    direction = diff_of_means_direction(red, blue)
    assert torch.allclose(direction, red.mean(0) - blue.mean(0), atol=1e-6)
    out = add_direction(h, direction, 0.5)
    unit = direction / direction.norm()
    assert torch.allclose((out - h) @ unit, 0.5 * mean_token_norm(h)[:, None].expand(2, 6), atol=1e-5)


# ----------------------------------------------------------------------------- gates


def test_cond_only_leaves_uncond_rows_bit_identical(sae, h):
    out = steer_function(sae, [Steer((3,), (0.5,))])(h, context(cond=(True, False)))
    assert torch.equal(out[1], h[1])
    assert not torch.equal(out[0], h[0])


def test_an_uncond_only_batch_is_returned_as_is(sae, h):
    fn = steer_function(sae, [Steer((3,), (0.5,))])
    assert fn(h, context(cond=(False, False))) is h


def test_without_cond_information_every_row_is_edited(sae, h):
    out = steer_function(sae, [Steer((3,), (0.5,))])(h, context(cond=None))
    assert not torch.equal(out[0], h[0]) and not torch.equal(out[1], h[1])


def test_subtract_uncond_applies_the_negated_edit_to_uncond_rows(sae, h):
    out = steer_function(sae, [Steer((3,), (1.5,), units="raw", subtract_uncond=True)])(h, context(cond=(True, False)))
    assert torch.allclose(out[0] - h[0], (1.5 * sae.direction(3)).expand(6, D), atol=1e-5)
    assert torch.allclose(out[1] - h[1], (-1.5 * sae.direction(3)).expand(6, D), atol=1e-5)


def test_mask_restricts_the_edit_to_painted_tokens(sae, h):
    mask = torch.zeros(4, 6)
    mask[:, :2] = 1.0  # the left third of the image: token column 0 of the 2x3 grid
    out = steer_function(sae, [Steer((3,), (0.5,), mask=mask, cond_only=False)])(h, context())
    inside = torch.tensor([0, 3])
    outside = torch.tensor([1, 2, 4, 5])
    assert torch.equal(out[:, outside], h[:, outside])
    assert not torch.equal(out[:, inside], h[:, inside])


def test_a_video_mask_steers_the_same_region_of_every_frame(sae):
    frames = 3
    x = 0.1 + 0.5 * torch.randn(1, frames * GRID[0] * GRID[1], D, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 6)
    mask[:, 4:] = 1.0  # the right third: token column 2
    ctx = dataclasses.replace(context(cond=None), frames=frames)
    out = steer_function(sae, [Steer((3,), (0.5,), units="raw", mask=mask, cond_only=False)])(x, ctx)
    changed = (out != x).any(-1)[0].reshape(frames, GRID[0], GRID[1])
    assert changed[:, :, 2].all() and not changed[:, :, :2].any()
    assert torch.allclose(out[0, 2] - x[0, 2], 0.5 * sae.direction(3), atol=1e-5)


def test_where_active_edits_only_tokens_where_the_feature_fires(sae, h):
    x = h.clone()
    x[..., 7] = 0.1  # normalised coordinate 0: feature 7 (+e_7) and 23 (-e_7) silent...
    x[0, 2, 7] = 3.0  # ...except on this token
    assert int((activation(sae, x, 7) > 0).sum()) == 1
    out = steer_function(sae, [Steer((7,), (1.0,), units="raw", where="where_active", cond_only=False)])(x, context())
    changed = (out != x).any(-1)
    assert changed.tolist() == [[False, False, True, False, False, False], [False] * 6]


def test_a_closed_sigma_window_returns_the_input_itself(sae, h):
    steer = Steer((3,), (0.5,), window=(0.0, 0.4), cond_only=False)
    fn = steer_function(sae, [steer])
    assert fn(h, context(sigma=2.0)) is h  # progress 2/3: after the window
    assert fn(h, context(sigma=7.0)) is not h  # between steps 0 and 1: inside
    sigma_gated = steer_function(sae, [Steer((3,), (0.5,), sigma_range=(4.0, 20.0), cond_only=False)])
    assert sigma_gated(h, context(sigma=1.0)) is h
    assert sigma_gated(h, context(sigma=5.0)) is not h


def test_several_steers_stack_in_order(sae, h):
    both = steer_function(sae, [Steer((3,), (1.0,), units="raw", cond_only=False),
                                Steer((4,), (2.0,), units="raw", cond_only=False)])(h, context())
    assert torch.allclose(both - h, (sae.direction(3) + 2.0 * sae.direction(4)).expand_as(h), atol=1e-5)
    add_then_clamp = steer_function(sae, [Steer((0,), (1.0,), units="raw", cond_only=False),
                                          Steer((0,), (5.0,), mode="clamp", units="raw", cond_only=False)])
    out = add_then_clamp(h, context())
    assert torch.allclose(activation(sae, out, 0), torch.full((2, 6), 5.0), atol=1e-5)


def test_clamp_in_mean_activation_units_targets_a_multiple_of_the_typical_activation(sae, h):
    out = steer_function(sae, [Steer((0,), (2.0,), mode="clamp", units="mean_activation", cond_only=False)])(h, context())
    assert torch.allclose(activation(sae, out, 0), (2.0 * sae.mean_activation[0]).expand(2, 6), atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_out_of_range_feature_names_the_dictionary_size(sae):
    with pytest.raises(DictionaryError, match="feature 40 is out of range: this dictionary has 32 latents"):
        steer_function(sae, [Steer((40,), (1.0,))])


def test_empty_mask_is_refused():
    with pytest.raises(SteerError, match="the mask is empty: paint the region to steer"):
        Steer((3,), (1.0,), mask=torch.zeros(8, 8))


@pytest.mark.parametrize("mask, message", [
    (torch.zeros(0, 0), r"the mask has no pixels \(shape \(0, 0\)\): paint the region to steer"),
    (torch.zeros(8, 0), r"the mask has no pixels \(shape \(8, 0\)\)"),
    (torch.full((8, 8), float("nan")), r"mask values must lie in \[0, 1\]"),
    (torch.ones(1, 8, 8), r"an \(H, W\) map, got shape \(1, 8, 8\)"),
])
def test_a_mask_without_pixels_or_of_another_shape_or_range_is_refused_with_the_fix(mask, message):
    with pytest.raises(SteerError, match=message):
        Steer((3,), (1.0,), mask=mask)


def test_unknown_mode_and_units_are_refused():
    with pytest.raises(SteerError, match="unknown steering mode 'boost'"):
        Steer((3,), (1.0,), mode="boost")
    with pytest.raises(SteerError, match="unknown steering units 'pixels'"):
        Steer((3,), (1.0,), units="pixels")


def test_mask_on_text_tokens_is_refused(sae, h):
    fn = steer_function(sae, [Steer((3,), (1.0,), mask=torch.ones(4, 6))])
    with pytest.raises(SteerError, match="mask needs image tokens"):
        fn(h, context(grid=None))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(features=(), strengths=(1.0,)), SteerError, "no features"),
    (dict(features=(1, 2, 3), strengths=(1.0, 2.0)), SteerError, "got 2 strengths for 3 features"),
    (dict(features=(1, 1), strengths=(1.0,)), SteerError, "listed twice"),
    (dict(features=(1, 2, 3), strengths=(1.0,), mode="swap"), SteerError, "pairs"),
    (dict(features=(1, 2), strengths=(1.5,), mode="swap"), SteerError, "swap strength 1.5: .* 0..1 .*use add"),
    (dict(features=(1,), strengths=(-0.5,), mode="ablate"), SteerError, "ablate strength -0.5: .* 0..1"),
    (dict(features=(1,), strengths=(1.0,), window=(0.8, 0.2)), ScheduleError, "swap start and end"),
])
def test_malformed_steers_are_refused_with_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        Steer(**kwargs)


def test_mean_activation_units_need_recorded_statistics(sae):
    bare = SparseAutoencoder(D, M, K)
    with pytest.raises(SteerError, match="no recorded mean activation.*'token_norm' or 'raw'"):
        steer_function(bare, [Steer((3,), (10.0,), units="mean_activation")])


def test_activations_of_another_width_are_refused(sae):
    fn = steer_function(sae, [Steer((3,), (1.0,))])
    with pytest.raises(DictionaryError, match="width 8 .* d_in=16"):
        fn(torch.zeros(1, 6, 8), context(cond=(True,)))
