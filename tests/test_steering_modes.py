"""Every steering mode, through ``Steer`` + ``steer_function`` (the path the nodes and the CLI use), pinned by value.

The dictionary is a real TopK SAE (12-d, 10 latents, k=3) with a non-trivial standardiser and biases. Its
encoder is the decoder's dual (``W_enc W_dec^T = I``), so adding ``c v_f`` in model space moves feature ``f``'s
pre-activation by exactly ``c`` and no other: after an edit, re-encoding reads back what the edit set. Everything
expected is computed here by hand, in float64, from dense codes and ``direction``.
"""
import pytest
import torch

from sae_core import SiteContext, SparseAutoencoder, Standardizer, Steer, steer_function
from sae_core.errors import DictionaryError, SteerError
from sae_core.kernels import SparseCodes

D, M, K = 12, 10, 3
F, G, E = 7, 5, 4  # the steered feature and two others, each active on some tokens of both rows
ATOL = 1e-5


@pytest.fixture(scope="module")
def sae():
    gen = torch.Generator().manual_seed(0)
    mean, std = 0.3 * torch.randn(D, generator=gen), 0.5 + 1.5 * torch.rand(D, generator=gen)
    standardizer = Standardizer(D, mean=mean, std=std)
    sae = SparseAutoencoder(D, M, K, standardizer=standardizer)
    w = torch.randn(M, D, generator=gen)
    w /= w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(torch.linalg.pinv(w).T)
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=gen))
        sae.b_enc.copy_(0.1 * torch.randn(M, generator=gen))
        sae.mean_activation.copy_(torch.linspace(0.5, 2.0, M))
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def h(sae):
    gen = torch.Generator().manual_seed(1)
    return sae.standardizer.mean + sae.standardizer.std * torch.randn(2, 8, D, generator=gen)


def ctx(cond=None, progress=None):
    return SiteContext(sigma=None, progress=progress, cond=None if cond is None else torch.tensor(cond), grid=None)


def run(sae, x, *steers, context=None):
    return steer_function(sae, list(steers))(x, context or ctx())


def act(sae, x, feature):
    """Feature activation per token, from dense codes (0 where not selected), float64."""
    return sae.dense_codes(x)[..., feature].double()


def v(sae, feature):
    return sae.direction(feature).double()


def moved(out, x):
    return out.double() - x.double()


def residual(sae, x):
    return x.double() - sae.decode(sae.encode(x)).double()


# ----------------------------------------------------------------------------- add


@pytest.mark.parametrize("units", ["token_norm", "raw", "mean_activation"])
def test_add_moves_every_token_by_strength_times_the_unit_scale_times_the_direction(sae, h, units):
    s = 0.7
    if units == "token_norm":  # the row's mean token norm along the *unit* direction
        scale = h.double().norm(dim=-1).mean(dim=-1)[:, None, None] / v(sae, F).norm()
    elif units == "mean_activation":
        scale = torch.tensor(float(sae.mean_activation[F]), dtype=torch.float64)
    else:
        scale = torch.tensor(1.0, dtype=torch.float64)
    out = run(sae, h, Steer((F,), (s,), units=units))
    expected = (s * scale * v(sae, F)).expand(h.shape)
    assert torch.allclose(moved(out, h), expected, atol=ATOL)


def test_add_of_several_features_sums_their_directions(sae, h):
    out = run(sae, h, Steer((F, G), (1.5, -0.5), units="raw"))
    assert torch.allclose(moved(out, h), (1.5 * v(sae, F) - 0.5 * v(sae, G)).expand(h.shape), atol=ATOL)


# ----------------------------------------------------------------------------- clamp


def test_clamp_moves_each_token_by_target_minus_its_current_activation(sae, h):
    target = 4.0
    out = run(sae, h, Steer((F,), (target,), mode="clamp", units="raw"))
    expected = (target - act(sae, h, F))[..., None] * v(sae, F)
    assert torch.allclose(moved(out, h), expected, atol=ATOL)


def test_clamp_sets_exactly_the_target_where_the_encoder_selects_the_feature(sae, h):
    """Where F was selected its activation is its pre-activation, so the edit lands it on the target; the other
    latents keep their values. (Where it was not selected it reads 0 and its hidden pre-activation is part of
    the reconstruction error, which clamp keeps.)"""
    target = 4.0  # above every token's other pre-activations: F stays selected
    out = run(sae, h, Steer((F,), (target,), mode="clamp", units="raw"))
    after, before = sae.dense_codes(out).double(), sae.dense_codes(h).double()
    selected = before[..., F] > 0
    assert bool(selected.any())
    assert torch.allclose(after[selected][:, F], torch.full((int(selected.sum()),), target, dtype=torch.float64),
                          atol=ATOL)
    others = [f for f in range(M) if f != F]
    assert torch.allclose(after[selected][:, others], before[selected][:, others], atol=ATOL)


def test_clamp_is_encode_edit_decode_with_the_reconstruction_error_kept(sae, h):
    target = 4.0
    out = run(sae, h, Steer((F,), (target,), mode="clamp", units="raw"))
    codes = sae.encode(h)
    edited = torch.where(codes.indices == F, torch.full_like(codes.values, target), codes.values)
    missing = ~(codes.indices == F).any(-1, keepdim=True)  # tokens where F was not selected: add it as a new slot
    values = torch.cat([edited, torch.where(missing, target, 0.0)], dim=-1)
    indices = torch.cat([codes.indices, torch.full_like(codes.indices[..., :1], F)], dim=-1)
    decoded = sae.decode(SparseCodes(values, indices)).double()
    assert torch.allclose(out.double() - decoded, residual(sae, h), atol=ATOL)


def test_clamp_in_mean_activation_units_targets_a_multiple_of_the_recorded_mean(sae, h):
    out = run(sae, h, Steer((F,), (3.0,), mode="clamp", units="mean_activation"))
    a = act(sae, h, F)
    expected = (3.0 * float(sae.mean_activation[F]) - a)[..., None] * v(sae, F)
    assert torch.allclose(moved(out, h), expected, atol=ATOL)


# ----------------------------------------------------------------------------- ablate


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_ablate_removes_the_fraction_of_the_activation(sae, h, fraction):
    out = run(sae, h, Steer((F,), (fraction,), mode="ablate"))
    expected = -fraction * act(sae, h, F)[..., None] * v(sae, F)
    assert torch.allclose(moved(out, h), expected, atol=ATOL)
    silent = act(sae, h, F) == 0
    assert bool(silent.any()) and torch.equal(out[silent], h[silent])


def test_full_ablation_makes_the_feature_read_zero(sae, h):
    out = run(sae, h, Steer((F,), (1.0,), mode="ablate"))
    active = act(sae, h, F) > 0
    assert bool(active.any())
    assert torch.allclose(act(sae, out, F)[active], torch.zeros(int(active.sum()), dtype=torch.float64), atol=ATOL)


# ----------------------------------------------------------------------------- swap


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_swap_moves_the_source_activation_onto_the_target(sae, h, fraction):
    out = run(sae, h, Steer((F, G), (fraction,), mode="swap"))
    a_src = act(sae, h, F)[..., None]
    expected = -fraction * a_src * v(sae, F) + fraction * a_src * v(sae, G)
    assert torch.allclose(moved(out, h), expected, atol=ATOL)
    silent = a_src[..., 0] == 0
    assert bool(silent.any()) and torch.equal(out[silent], h[silent])


# ----------------------------------------------------------------------------- where_active


@pytest.mark.parametrize("mode, strength", [("add", 1.5), ("clamp", 4.0)])
def test_where_active_leaves_tokens_where_the_feature_is_silent_bit_identical(sae, h, mode, strength):
    out = run(sae, h, Steer((F,), (strength,), mode=mode, units="raw", where="where_active"))
    a = act(sae, h, F)
    silent = a == 0
    assert torch.equal(out[silent], h[silent])
    coefficient = strength if mode == "add" else strength - a[~silent]
    expected = torch.as_tensor(coefficient, dtype=torch.float64).reshape(-1, 1) * v(sae, F)
    assert torch.allclose(moved(out, h)[~silent], expected.expand(int((~silent).sum()), D), atol=ATOL)


# ----------------------------------------------------------------------------- detect


def test_detect_edits_only_tokens_where_a_detect_feature_fires(sae, h):
    out = run(sae, h, Steer((F,), (1.5,), units="raw", detect=(G,)))
    detected = act(sae, h, G) > 0
    assert 0 < int(detected.sum()) < detected.numel()
    assert torch.equal(out[~detected], h[~detected])
    assert torch.allclose(moved(out, h)[detected], (1.5 * v(sae, F)).expand(int(detected.sum()), D), atol=ATOL)


def test_detect_reads_any_of_its_features_above_the_threshold(sae, h):
    threshold = 1.2
    out = run(sae, h, Steer((F,), (1.0,), units="raw", detect=(G, E), detect_threshold=threshold))
    detected = (act(sae, h, G) > threshold) | (act(sae, h, E) > threshold)
    assert 0 < int(detected.sum()) < int(((act(sae, h, G) > 0) | (act(sae, h, E) > 0)).sum())
    assert ((out != h).any(-1) == detected).all()


@pytest.mark.parametrize("mode, strength", [("clamp", 4.0), ("ablate", 1.0), ("swap", 1.0)])
def test_detect_gates_every_mode_and_edits_detected_tokens_as_the_mode_says(sae, h, mode, strength):
    features = (F, G) if mode == "swap" else (F,)
    out = run(sae, h, Steer(features, (strength,), mode=mode, units="raw", detect=(F, E)))
    detected = (act(sae, h, F) > 0) | (act(sae, h, E) > 0)
    a = act(sae, h, F)[..., None]
    expected = {"clamp": (strength - a) * v(sae, F), "ablate": -strength * a * v(sae, F),
                "swap": strength * a * (v(sae, G) - v(sae, F))}[mode]
    assert torch.equal(out[~detected], h[~detected])
    assert torch.allclose(moved(out, h)[detected], expected[detected], atol=ATOL)


def test_when_nothing_is_detected_the_input_itself_comes_back(sae, h):
    fn = steer_function(sae, [Steer((F,), (1.5,), units="raw", detect=(G,), detect_threshold=1e6)])
    assert fn(h, ctx()) is h


def test_steers_sharing_a_detect_set_act_on_the_same_tokens_whatever_their_order(sae, h):
    """Ablating the detect feature first must not hide its tokens from the next steer (detect-then-replace)."""
    ablate = Steer((G,), (1.0,), mode="ablate", detect=(G,))
    add = Steer((F,), (2.0,), units="raw", detect=(G,))
    detected = act(sae, h, G) > 0
    expected = -act(sae, h, G)[..., None] * v(sae, G) + torch.where(detected[..., None], 2.0 * v(sae, F), 0.0)
    out = run(sae, h, ablate, add)
    assert torch.equal(out[~detected], h[~detected])
    assert torch.allclose(moved(out, h), expected, atol=ATOL)
    reversed_order = run(sae, h, add, ablate)  # the ablation then reads G on the added-to tokens, but the same ones
    assert ((reversed_order != h).any(-1) == detected).all()


def test_detect_combines_with_cond_rows(sae, h):
    out = run(sae, h, Steer((F,), (1.5,), units="raw", detect=(G,)), context=ctx(cond=(True, False)))
    detected = act(sae, h, G)[0] > 0
    assert torch.equal(out[1], h[1])
    assert torch.equal(out[0][~detected], h[0][~detected])
    assert torch.allclose(moved(out, h)[0][detected], (1.5 * v(sae, F)).expand(int(detected.sum()), D), atol=ATOL)


@pytest.mark.parametrize("kwargs, message", [
    (dict(detect=(3, 3)), "detect feature.*3 listed twice"),
    (dict(detect=(2.5,)), "detect lists feature ids"),
    (dict(detect=(True,)), "detect lists feature ids"),
    (dict(detect=(3,), detect_threshold=-0.1), "detect_threshold -0.1: use a finite activation >= 0"),
    (dict(detect=(3,), detect_threshold=float("nan")), "detect_threshold nan"),
])
def test_malformed_detection_is_refused_with_the_fix(kwargs, message):
    with pytest.raises(SteerError, match=message):
        Steer((F,), (1.0,), **kwargs)


def test_detect_ids_outside_the_dictionary_are_refused_before_sampling(sae):
    with pytest.raises(DictionaryError, match="detect feature 10 is out of range: this dictionary has 10 latents"):
        steer_function(sae, [Steer((F,), (1.0,), detect=(1, 10))])


# ----------------------------------------------------------------------------- rows and windows


def test_cond_only_edits_only_cond_rows(sae, h):
    out = run(sae, h, Steer((F,), (1.0,), units="raw"), context=ctx(cond=(False, True)))
    assert torch.equal(out[0], h[0])
    assert torch.allclose(moved(out, h)[1], v(sae, F).expand(8, D), atol=ATOL)


def test_without_cond_only_every_row_gets_the_same_edit(sae, h):
    out = run(sae, h, Steer((F,), (1.0,), units="raw", cond_only=False), context=ctx(cond=(True, False)))
    assert torch.allclose(moved(out, h), v(sae, F).expand(h.shape), atol=ATOL)


def test_subtract_uncond_applies_the_negated_edit_to_uncond_rows(sae, h):
    out = run(sae, h, Steer((F,), (0.5,), mode="ablate", subtract_uncond=True), context=ctx(cond=(True, False)))
    expected = -0.5 * act(sae, h, F)[..., None] * v(sae, F)
    assert torch.allclose(moved(out, h)[0], expected[0], atol=ATOL)
    assert torch.allclose(moved(out, h)[1], -expected[1], atol=ATOL)


@pytest.mark.parametrize("mode", ["add", "clamp", "ablate", "swap"])
def test_outside_its_window_a_steer_returns_the_input_itself(sae, h, mode):
    features = (F, G) if mode == "swap" else (F,)
    steer = Steer(features, (1.0,), mode=mode, units="raw", window=(0.2, 0.5), detect=(G,) if mode == "add" else ())
    fn = steer_function(sae, [steer])
    assert fn(h, ctx(progress=0.1)) is h
    assert fn(h, ctx(progress=0.6)) is h
    assert not torch.equal(fn(h, ctx(progress=0.3)), h)
