"""Concepts: weighted sets of features found from examples or from an index's words, added and swapped.

What users rely on: mean codes are the plain mean of the sparse codes; a concept's direction is the difference of
the mean reconstructions (the decoder bias and the input statistics cancel); top_n keeps the largest differences
with their values; steering with a concept adds exactly its direction; replacing one concept by another touches
only the source's tokens. The dictionary is a random TopK SAE behind a non-trivial standardiser, with biases.
"""
import math

import pytest
import torch

import sae_core.concepts as concepts
from sae_core import (Concept, ScheduledConcept, SiteContext, SpatialConcept, SparseAutoencoder, Standardizer,
                      StepCodeMeter, clamp_steer_function, concept_from_codes, concept_from_words, mean_codes,
                      replace_steers, scheduled_concept_from_codes, scheduled_concept_from_meters,
                      spatial_concept_from_codes, spatial_steer_function, steer_function)
from sae_core.errors import DictionaryError, ScheduleError, SteerError
from sae_core.feature_index import open_index
from sae_core.kernels import SparseCodes

D, M, K = 12, 16, 3
INDEX = "models/sae/organism_unet_ob3_residual.features"
ATOL = 1e-5


@pytest.fixture(scope="module")
def sae():
    gen = torch.Generator().manual_seed(2)
    mean, std = 0.3 * torch.randn(D, generator=gen), 0.5 + 1.5 * torch.rand(D, generator=gen)
    standardizer = Standardizer(D, mean=mean, std=std)
    sae = SparseAutoencoder(D, M, K, standardizer=standardizer, seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=gen))
        sae.b_enc.copy_(0.1 * torch.randn(M, generator=gen))
    return sae.requires_grad_(False)


def activations(sae, seed, shape=(2, 8)):
    gen = torch.Generator().manual_seed(seed)
    return sae.standardizer.mean + sae.standardizer.std * torch.randn(*shape, D, generator=gen)


def dense_mean(sae, x):
    return sae.dense_codes(x).reshape(-1, M).double().mean(0)


def decode_dense(sae, codes):
    """Decode a dense (M,) code vector: every latent as one slot."""
    return sae.decode(SparseCodes(codes.float()[None], torch.arange(M)[None]))[0].double()


def ctx(cond=None, progress=None):
    return SiteContext(sigma=None, progress=progress, cond=None if cond is None else torch.tensor(cond), grid=None)


# ----------------------------------------------------------------------------- mean codes


def test_mean_codes_is_the_dense_mean_of_the_codes(sae):
    x = activations(sae, 0, (3, 5))
    expected = dense_mean(sae, x)
    assert mean_codes(sae, x).dtype == torch.float64
    assert torch.allclose(mean_codes(sae, x), expected, atol=1e-6)
    assert torch.allclose(mean_codes(sae, x.reshape(15, D)), expected, atol=1e-6)


def test_mean_codes_weights_rows_and_gives_the_same_mean_in_chunks(sae, monkeypatch):
    x = activations(sae, 1, (10,))
    w = torch.linspace(0.0, 1.0, 10)  # sums to 5, not to the 10 rows
    expected = (sae.dense_codes(x).double() * w.double()[:, None]).sum(0) / w.double().sum()
    whole = mean_codes(sae, x, w)
    monkeypatch.setattr(concepts, "ENCODE_ELEMENTS", 3 * M)  # chunks of 3 rows
    assert torch.allclose(whole, expected, atol=1e-6)
    assert torch.allclose(mean_codes(sae, x, w), expected, atol=1e-6)
    assert torch.allclose(mean_codes(sae, x), dense_mean(sae, x), atol=1e-6)


@pytest.mark.parametrize("x, weights, error, message", [
    (torch.zeros(4, 8), None, DictionaryError, "width 8 but the dictionary expects d_in=12"),
    (torch.zeros(0, D), None, SteerError, "at least one activation row"),
    (torch.full((2, D), float("nan")), None, SteerError, "2 activation row"),
    (torch.zeros(D), None, SteerError, r"\(N, d\) or \(batch, tokens, d\)"),
    (torch.zeros(4, D), torch.ones(3), SteerError, "row weights shaped"),
    (torch.zeros(4, D), torch.zeros(4), SteerError, "not all 0"),
    (torch.zeros(4, D), -torch.ones(4), SteerError, ">= 0"),
])
def test_mean_codes_refuses_what_it_cannot_average(sae, x, weights, error, message):
    with pytest.raises(error, match=message):
        mean_codes(sae, x, weights)


# ----------------------------------------------------------------------------- concepts from codes


def test_a_concept_of_every_differing_feature_is_the_difference_of_mean_reconstructions(sae):
    positive, negative = activations(sae, 2, (4, 8)), activations(sae, 3, (4, 8))
    pos, neg = mean_codes(sae, positive), mean_codes(sae, negative)
    concept = concept_from_codes(pos, neg, top_n=M, dictionary=sae)
    direction = concept.direction(sae).double()
    assert torch.allclose(direction, decode_dense(sae, pos) - decode_dense(sae, neg), atol=ATOL)
    recon = lambda x: sae.decode(sae.encode(x)).double().reshape(-1, D).mean(0)  # noqa: E731
    assert torch.allclose(direction, recon(positive) - recon(negative), atol=ATOL)
    assert concept.coverage == pytest.approx(1.0)
    assert concept.direction(sae).dtype == torch.float32


def test_top_n_keeps_the_largest_differences_with_their_values():
    positive = torch.tensor([0.0, 3.0, 1.0, 0.5, 0.0, 2.0, 1.0, 0.0])
    negative = torch.tensor([0.0, 0.5, 4.0, 0.5, 1.0, 0.0, 0.0, 1.0])
    # difference:           0   2.5  -3    0    -1    2    1    -1
    concept = concept_from_codes(positive, negative, top_n=3)
    assert concept.features == (2, 1, 5)
    assert concept.weights == (-3.0, 2.5, 2.0)
    assert math.isnan(concept.coverage)
    everything = concept_from_codes(positive, negative, top_n=100)
    assert everything.features == (2, 1, 5, 4, 6, 7)  # exact zeros dropped; ties: lower id first
    assert everything.weights == (-3.0, 2.5, 2.0, -1.0, 1.0, -1.0)


def test_sign_positive_keeps_only_what_the_positives_add():
    positive = torch.tensor([0.0, 3.0, 1.0, 0.5, 0.0, 2.0, 1.0, 0.0])
    negative = torch.tensor([0.0, 0.5, 4.0, 0.5, 1.0, 0.0, 0.0, 1.0])
    concept = concept_from_codes(positive, negative, top_n=10, sign="positive")
    assert concept.features == (1, 5, 6)
    assert concept.weights == (2.5, 2.0, 1.0)


def test_coverage_is_the_norm_share_of_the_kept_features_direction(sae):
    pos, neg = mean_codes(sae, activations(sae, 4)), mean_codes(sae, activations(sae, 5))
    concept = concept_from_codes(pos, neg, top_n=3, dictionary=sae)
    diff = pos - neg
    full = sum(float(diff[f]) * sae.direction(f).double() for f in range(M))
    kept = sum(w * sae.direction(f).double() for f, w in zip(concept.features, concept.weights))
    assert concept.coverage == pytest.approx(float(kept.norm() / full.norm()), rel=1e-6)
    assert 0 < concept.coverage < 1


@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.ones(4), torch.zeros(4), 0), {}, "top_n=0: keep at least 1"),
    ((torch.ones(4), torch.zeros(4), 2), {"sign": "negative"}, "unknown concept sign 'negative'"),
    ((torch.ones(4), torch.zeros(5), 2), {}, "4 and 5 latents"),
    ((torch.ones(4), torch.tensor([0.0, float("nan"), 0, 0]), 2), {}, "negative mean codes hold NaN"),
    ((torch.ones(4), torch.ones(4), 2), {}, "no feature differs"),
    ((torch.zeros(4), torch.ones(4), 2), {"sign": "positive"}, "no feature is stronger on the positives"),
    ((torch.ones(2, 4), torch.zeros(2, 4), 2), {}, r"one \(n_latents,\) vector"),
])
def test_concept_from_codes_refuses_what_gives_no_concept(args, kwargs, message):
    with pytest.raises(SteerError, match=message):
        concept_from_codes(*args, **kwargs)


def test_coverage_needs_the_dictionary_that_encoded_the_codes(sae):
    with pytest.raises(DictionaryError, match="8 latents but the dictionary has 16"):
        concept_from_codes(torch.ones(8), torch.zeros(8), 2, dictionary=sae)


# ----------------------------------------------------------------------------- steering with concepts


def test_steering_with_a_concept_at_strength_one_adds_exactly_its_direction(sae):
    h = activations(sae, 6)
    concept = Concept((10, 3, 12), (1.5, 0.5, -0.7))
    out = steer_function(sae, [concept.steer()])(h, ctx())
    assert torch.allclose(out.double() - h.double(), concept.direction(sae).double().expand(h.shape), atol=ATOL)
    doubled = steer_function(sae, [concept.steer(2.0, cond_only=True)])(h, ctx(cond=(True, False)))
    assert torch.allclose(doubled[0] - h[0], 2 * concept.direction(sae).expand(8, D), atol=ATOL)
    assert torch.equal(doubled[1], h[1])


def test_a_concept_steer_keeps_its_mode_and_units():
    with pytest.raises(SteerError, match="drop mode, units"):
        Concept((1,), (1.0,)).steer(units="token_norm", mode="clamp")


@pytest.mark.parametrize("features, weights, message", [
    ((), (), "at least one feature"),
    ((1, 2), (1.0,), "2 feature.*1 weight"),
    ((1, 1), (1.0, 2.0), "twice"),
    ((1,), (float("inf"),), "finite"),
    ((-1,), (1.0,), "not a feature id"),
])
def test_malformed_concepts_are_refused(features, weights, message):
    with pytest.raises(SteerError, match=message):
        Concept(features, weights)


def test_a_concept_direction_needs_features_of_the_dictionary(sae):
    with pytest.raises(DictionaryError, match="concept feature 20 is out of range: this dictionary has 16"):
        Concept((20,), (1.0,)).direction(sae)


# ----------------------------------------------------------------------------- replacing one concept by another


SOURCE = Concept((3, 9, 0), (1.2, 0.8, -0.4))  # features 3 and 9 locate it; 0 is what it lowers
TARGET = Concept((10, 12), (1.5, -0.7))


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_replace_removes_the_source_and_adds_the_target_only_on_the_source_tokens(sae, strength):
    h = activations(sae, 7)
    out = steer_function(sae, replace_steers(SOURCE, TARGET, strength))(h, ctx())
    codes = sae.dense_codes(h).double()
    detected = (codes[..., 3] > 0) | (codes[..., 9] > 0)
    assert 0 < int(detected.sum()) < detected.numel()
    assert torch.equal(out[~detected], h[~detected])
    removed = codes[..., 3, None] * sae.direction(3).double() + codes[..., 9, None] * sae.direction(9).double()
    expected = -min(strength, 1.0) * removed + strength * TARGET.direction(sae).double()
    assert torch.allclose((out.double() - h.double())[detected], expected[detected], atol=ATOL)


def test_replace_detects_above_the_threshold_and_honours_the_other_gates(sae):
    h = activations(sae, 7)
    codes = sae.dense_codes(h).double()
    threshold = 0.5 * float(codes[..., [3, 9]].max())
    steers = replace_steers(SOURCE, TARGET, 1.0, detect_threshold=threshold, window=(0.0, 0.5))
    fn = steer_function(sae, steers)
    detected = (codes[..., 3] > threshold) | (codes[..., 9] > threshold)
    assert 0 < int(detected.sum()) < int(((codes[..., 3] > 0) | (codes[..., 9] > 0)).sum())
    assert ((fn(h, ctx(progress=0.2)) != h).any(-1) == detected).all()
    assert fn(h, ctx(progress=0.9)) is h


def test_replace_encodes_the_activations_once_per_call(sae, monkeypatch):
    h = activations(sae, 7)
    fn = steer_function(sae, replace_steers(SOURCE, TARGET))
    calls = []
    encode = sae.encode
    monkeypatch.setattr(sae, "encode", lambda x: calls.append(x.shape) or encode(x))
    fn(h, ctx())
    assert len(calls) == 1


@pytest.mark.parametrize("source, kwargs, message", [
    (Concept((0,), (-1.0,)), {}, "no positive-weight feature"),
    (SOURCE, {"strength": -1.0}, "replace strength -1: use >= 0"),
    (SOURCE, {"detect": (1,)}, "drop detect"),
])
def test_replace_refuses_what_cannot_find_or_replace(source, kwargs, message):
    with pytest.raises(SteerError, match=message):
        replace_steers(source, TARGET, **kwargs)


# ----------------------------------------------------------------------------- concepts from an index's words


@pytest.fixture(scope="module")
def index():
    return open_index(INDEX)


def test_a_word_concept_ranks_the_features_associated_with_the_word(index):
    concept = concept_from_words(index, " Seven", top_n=4)
    scored = {}
    for i, words in enumerate(index.summary()["words"]):
        if "seven" in words.split():
            record = index.feature(i)
            score = dict(record["words"])["seven"]
            code = record["mean"] * record["frequency"] / record["image_frequency"]  # mean code where it fires
            scored[i] = (score * record["mean"], score, code)
    ranked = sorted(scored, key=lambda i: (-scored[i][0], i))[:4]
    assert concept.features == tuple(ranked)
    best = max(scored[i][1] for i in ranked)
    assert concept.weights == pytest.approx([scored[i][2] * scored[i][1] / best for i in ranked])
    assert all("seven" in index.summary()["words"][f].split() for f in concept.features)


def test_an_unknown_word_names_itself_and_words_the_index_knows(index):
    with pytest.raises(SteerError, match=r"the word 'sevn'; words it knows include seven"):
        concept_from_words(index, "sevn", top_n=4)


@pytest.mark.parametrize("word, top_n, message", [
    ("red car", 4, "give one word of letters"),
    ("", 4, "give one word"),
    ("seven", 0, "top_n=0"),
])
def test_a_word_concept_refuses_malformed_requests(index, word, top_n, message):
    with pytest.raises(SteerError, match=message):
        concept_from_words(index, word, top_n)


# ----------------------------------------------------------------------------- concepts per token position


def test_a_spatial_concept_keeps_each_positions_largest_differences():
    gen = torch.Generator().manual_seed(5)
    positive, negative = torch.rand(4, 10, generator=gen), torch.rand(4, 10, generator=gen)
    concept = spatial_concept_from_codes(positive, negative, top_n=3)
    diff = (positive - negative).double()
    for p in range(4):
        expected = diff[p].abs().argsort(descending=True)[:3]
        assert concept.features[p].tolist() == expected.tolist()
        assert torch.allclose(concept.weights[p].double(), diff[p, expected], atol=1e-6)


def test_a_spatial_concept_adds_each_positions_vector_on_the_prompt_rows_only(sae):
    concept = SpatialConcept(torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]]))
    vectors = torch.stack([sum(float(w) * sae.direction(int(f)) for f, w in zip(fs, ws))
                           for fs, ws in zip(concept.features, concept.weights)])
    assert torch.allclose(concept.vectors(sae), vectors, atol=1e-5)
    steer = spatial_steer_function(sae, concept, strength=2.0, window=(0.0, 0.5))
    h = torch.randn(2, 3, sae.d_in)
    cond = torch.tensor([False, True])
    out = steer(h, SiteContext(sigma=0.8, progress=0.2, cond=cond, grid=None))
    assert torch.equal(out[0], h[0]) and torch.allclose(out[1] - h[1], 2.0 * vectors, atol=1e-5)
    assert steer(h, SiteContext(sigma=0.2, progress=0.8, cond=cond, grid=None)) is h  # outside the window
    with pytest.raises(SteerError, match="measured on 3 tokens"):
        steer(torch.randn(2, 5, sae.d_in), SiteContext(sigma=0.8, progress=0.2, cond=cond, grid=None))


@pytest.mark.parametrize("features, weights, message", [
    ([[1, 2]], [[0.5]], "one shape"),
    ([[1.0, 2.0]], [[0.5, 0.5]], "integer feature ids"),
    ([[1, 2]], [[float("nan"), 0.5]], "finite"),
])
def test_a_malformed_spatial_concept_is_refused(features, weights, message):
    with pytest.raises(SteerError, match=message):
        SpatialConcept(torch.tensor(features), torch.tensor(weights))


# ----------------------------------------------------------------------------- clamped per step and position


def test_a_scheduled_concept_keeps_each_steps_and_positions_largest_differences_with_the_positive_targets():
    gen = torch.Generator().manual_seed(6)
    positive, negative = torch.rand(3, 4, 10, generator=gen), torch.rand(3, 4, 10, generator=gen)
    concept = scheduled_concept_from_codes(positive, negative, top_n=3)
    assert concept.progress.tolist() == [0.0, 0.5, 1.0]
    for t in range(3):
        for p in range(4):
            expected = (positive - negative)[t, p].abs().argsort(descending=True)[:3]
            assert concept.features[t, p].tolist() == expected.tolist()
            assert torch.equal(concept.targets[t, p], positive[t, p, expected])


def test_a_clamp_sets_each_feature_to_its_target_and_keeps_the_rest_of_the_activation(sae):
    h = activations(sae, 7, (2, 3))
    features = torch.tensor([[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [10, 11]]])
    targets = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(8)) * 3
    concept = ScheduledConcept(features, targets, torch.tensor([0.0, 1.0]))
    cond = torch.tensor([False, True])
    steer = clamp_steer_function(sae, concept, strength=1.0)
    out = steer(h, SiteContext(sigma=0.1, progress=0.9, cond=cond, grid=None))  # nearest measured step: 1
    assert torch.equal(out[0], h[0])  # the unconditional row is untouched
    current = sae.dense_codes(h[1])  # (tokens, M)
    for p in range(3):
        expected = sum(float(targets[1, p, j] - current[p, features[1, p, j]]) * sae.direction(int(features[1, p, j]))
                       for j in range(2))
        assert torch.allclose(out[1, p] - h[1, p], expected, atol=1e-5)
    half = clamp_steer_function(sae, concept, strength=0.5)(h, SiteContext(sigma=0.1, progress=0.9, cond=cond,
                                                                           grid=None))
    assert torch.allclose(half[1] - h[1], 0.5 * (out[1] - h[1]), atol=1e-5)
    assert clamp_steer_function(sae, concept, window=(0.0, 0.5))(h, SiteContext(sigma=0.1, progress=0.9, cond=cond,
                                                                                 grid=None)) is h


def test_a_clamp_at_the_targets_own_codes_changes_nothing(sae):
    h = activations(sae, 9, (1, 4))
    codes = sae.dense_codes(h)[0]  # (tokens, M)
    features = codes.argsort(-1, descending=True)[:, :2]
    concept = ScheduledConcept(features[None], codes.gather(-1, features)[None], torch.tensor([0.0]))
    out = clamp_steer_function(sae, concept)(h, ctx(progress=0.3))
    assert torch.allclose(out, h, atol=1e-5)


def test_a_clamp_under_a_mask_edits_each_token_by_the_masks_weight_there(sae):
    h = activations(sae, 11, (1, 4))
    concept = ScheduledConcept(torch.tensor([[[0, 1]] * 4]), torch.full((1, 4, 2), 2.0), torch.tensor([0.0]))
    mask = torch.tensor([[1.0, 0.0], [0.5, 0.0]])  # a 2x2 image over a 2x2 token grid
    context = SiteContext(sigma=None, progress=0.0, cond=None, grid=(2, 2))
    full = clamp_steer_function(sae, concept)(h, context) - h
    masked = clamp_steer_function(sae, concept, mask=mask)(h, context) - h
    assert torch.allclose(masked[0], full[0] * torch.tensor([1.0, 0.0, 0.5, 0.0])[:, None], atol=1e-6)
    with pytest.raises(SteerError, match="no grid"):
        clamp_steer_function(sae, concept, mask=mask)(h, ctx(progress=0.0))


def test_a_clamp_refuses_another_resolution_and_a_runtime_without_a_step(sae):
    concept = ScheduledConcept(torch.zeros(1, 3, 1, dtype=torch.long), torch.ones(1, 3, 1), torch.tensor([0.0]))
    steer = clamp_steer_function(sae, concept)
    with pytest.raises(SteerError, match="measured on 3 tokens"):
        steer(torch.randn(1, 5, D), ctx(progress=0.0))
    with pytest.raises(ScheduleError, match="sampling progress"):
        steer(torch.randn(1, 3, D), ctx())


def test_the_step_meter_measures_the_mean_codes_of_each_step_and_position(sae):
    steps = [activations(sae, 20 + t, (2, 4)) for t in range(3)]
    others = [activations(sae, 30 + t, (2, 4)) for t in range(3)]
    positive, negative = StepCodeMeter(sae), StepCodeMeter(sae)
    for meter, xs in ((positive, steps), (negative, others)):
        for t, x in enumerate(xs):  # two rows of guidance: the prompt's is the second
            h = torch.cat([torch.randn_like(x[:1]), x[1:]])
            assert meter(h, ctx(cond=[False, True], progress=t / 2)) is h
            meter(x[:1], ctx(progress=t / 2))
    dense = [torch.stack([sae.dense_codes(x).mean(0) for x in xs]) for xs in (steps, others)]
    assert torch.allclose(positive.step_mean(0.5), dense[0][1], atol=1e-6)
    from_meters = scheduled_concept_from_meters(positive, negative, top_n=2)
    from_codes = scheduled_concept_from_codes(dense[0], dense[1], top_n=2)
    assert torch.equal(from_meters.features, from_codes.features)
    assert torch.allclose(from_meters.targets, from_codes.targets, atol=1e-6)
    assert from_meters.progress.tolist() == [0.0, 0.5, 1.0]


def test_the_step_meter_refuses_nan_and_mismatched_measurements(sae):
    meter = StepCodeMeter(sae)
    with pytest.raises(SteerError, match="NaN or inf"):
        meter(torch.full((1, 3, D), float("nan")), ctx(progress=0.0))
    with pytest.raises(ScheduleError, match="never reached the site"):
        scheduled_concept_from_meters(meter, StepCodeMeter(sae), top_n=1)
    meter(activations(sae, 1, (1, 3)), ctx(progress=0.0))
    other = StepCodeMeter(sae)
    other(activations(sae, 2, (1, 3)), ctx(progress=0.5))
    with pytest.raises(SteerError, match="different steps"):
        scheduled_concept_from_meters(meter, other, top_n=1)


@pytest.mark.parametrize("features, targets, progress, message", [
    ([[[1, 2]]], [[[0.5]]], [0.0], "one shape"),
    ([[[1.0, 2.0]]], [[[0.5, 0.5]]], [0.0], "integer feature ids"),
    ([[[1, 2]]], [[[float("inf"), 0.5]]], [0.0], "finite"),
    ([[[1, 2]], [[1, 2]]], [[[1.0, 1.0]], [[1.0, 1.0]]], [0.5, 0.5], "increasing"),
    ([[[1, 2]]], [[[1.0, 1.0]]], [1.5], "in \\[0, 1\\]"),
])
def test_a_malformed_scheduled_concept_is_refused(features, targets, progress, message):
    with pytest.raises(SteerError, match=message):
        ScheduledConcept(torch.tensor(features), torch.tensor(targets), torch.tensor(progress))
