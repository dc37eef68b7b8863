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
from sae_core import (Concept, SiteContext, SpatialConcept, SparseAutoencoder, Standardizer, concept_from_codes,
                      concept_from_words, mean_codes, replace_steers, spatial_concept_from_codes, spatial_steer_function,
                      steer_function)
from sae_core.errors import DictionaryError, SteerError
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
