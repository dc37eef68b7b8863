"""A SparseAutoencoder is an encode/decode pair in the model's own activation space."""
import numpy as np
import pytest
import torch

from sae_core.errors import ConfigError, DictionaryError
from sae_core.itda import ITDA
from sae_core.kernels import SparseCodes
from sae_core.normalize import Standardizer, fit_standardizer
from sae_core.sae import SparseAutoencoder
from sae_core.sites import Site


def make_sae(kind="topk", d=12, n=48, k=4, standardizer=None):
    return SparseAutoencoder(d, n, k, kind, site=Site("flux", "double_blocks.18", "image"), standardizer=standardizer)


def test_encode_returns_k_nonnegative_codes_and_decode_inverts_shape():
    sae = make_sae()
    x = torch.randn(2, 5, 12)
    codes = sae.encode(x)
    assert codes.values.shape == (2, 5, 4) and codes.indices.shape == (2, 5, 4)
    assert bool((codes.values >= 0).all())
    assert sae.decode(codes).shape == (2, 5, 12)


def test_decode_is_in_model_space_when_a_standardizer_is_used():
    std = Standardizer(12, mean=torch.full((12,), 5.0), std=torch.full((12,), 3.0))
    sae = make_sae(standardizer=std)
    zero = sae.encode(torch.randn(1, 12))._replace(values=torch.zeros(1, 4))
    torch.testing.assert_close(sae.decode(zero), sae.b_dec.detach()[None] * 3.0 + 5.0)


def test_feature_direction_is_the_decoder_row_in_model_space():
    std = Standardizer(12, std=torch.linspace(1, 2, 12))
    sae = make_sae(standardizer=std)
    torch.testing.assert_close(sae.direction(3), sae.W_dec[3].detach() * torch.linspace(1, 2, 12))
    assert abs(float(sae.direction(3, unit=True).norm()) - 1) < 1e-6


def test_feature_out_of_range_is_a_clear_error():
    with pytest.raises(DictionaryError, match="out of range.*48 latents"):
        make_sae().direction(48)


def test_wrong_width_names_the_site_and_expected_width():
    with pytest.raises(DictionaryError, match="width 10 .*double_blocks.18.*d_in=12"):
        make_sae().encode(torch.randn(3, 10))


def test_k_larger_than_the_dictionary_is_refused():
    with pytest.raises(ConfigError, match="k=64 must be between 1 and n_latents=48"):
        make_sae(k=64)


def test_unknown_kind_is_refused():
    with pytest.raises(ConfigError, match="unknown SAE kind"):
        make_sae(kind="gated")


def test_decoder_rows_stay_unit_norm_and_gradient_moves_along_the_sphere():
    sae = make_sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert parallel.abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(48))


def test_batchtopk_inference_uses_the_learned_threshold():
    sae = make_sae("batchtopk")
    x = torch.randn(64, 12)
    sae.threshold.fill_(0.3)
    dense = sae.dense_codes(x)
    pre = sae.pre_activations(x)
    torch.testing.assert_close(dense, torch.where(pre > 0.3, pre, torch.zeros_like(pre)))


def test_scale_normalisation_makes_mean_squared_norm_equal_width():
    x = torch.randn(1000, 16) * 250.0
    std = fit_standardizer(x, "scale")
    xn = std.normalize(x)
    assert abs(float(xn.pow(2).sum(-1).mean()) / 16 - 1) < 1e-3


@pytest.mark.parametrize("x, message", [
    (torch.tensor(1.0), "got a single number \\(a 0-d tensor\\)"),
    (np.zeros((2, 12), dtype=np.float32), "must be a torch tensor of shape \\(..., 12\\), got ndarray"),
    (torch.ones(2, 12, dtype=torch.int64), "must be floating point, got torch.int64"),
    (torch.ones(2, 11), "width 11 .*d_in=12"),
    ([[0.0] * 12], "got list"),
])
def test_encode_refuses_anything_but_floating_point_activations_of_its_width(x, message):
    with pytest.raises(DictionaryError, match=message) as raised:
        make_sae().encode(x)
    assert "\n" not in str(raised.value)


def test_decode_refuses_codes_that_encode_did_not_make():
    sae = make_sae()
    codes = sae.encode(torch.randn(3, 12))
    with pytest.raises(DictionaryError, match="codes must be SparseCodes"):
        sae.decode(codes.values)
    with pytest.raises(DictionaryError, match="must have one shape"):
        sae.decode(SparseCodes(codes.values, codes.indices[:, :2]))
    with pytest.raises(DictionaryError, match="indices integers, got torch.float32 and torch.float32"):
        sae.decode(SparseCodes(codes.values, codes.indices.float()))
    with pytest.raises(DictionaryError, match="code indices must lie in 0..47"):
        sae.decode(SparseCodes(codes.values, codes.indices + 48))


def every_kind(kind):
    if kind == "itda":
        itda = ITDA(12, 3)
        itda.grow(torch.randn(64, 12, generator=torch.Generator().manual_seed(0)))
        return itda
    sae = make_sae(kind, standardizer=Standardizer(12, mean=torch.randn(12), std=torch.rand(12) + 0.5))
    sae.threshold.fill_(0.1)
    return sae


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu", "jumprelu", "itda"])
def test_a_non_finite_input_row_encodes_and_decodes_to_nan_and_leaves_other_rows_alone(kind):
    dictionary = every_kind(kind)
    x = torch.randn(4, 12)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    codes = dictionary.encode(x)
    assert codes.values[[1, 2]].isnan().all()
    reconstruction = dictionary.decode(codes)
    assert reconstruction[[1, 2]].isnan().all()
    for row in (0, 3):
        alone = dictionary(x[row:row + 1])[0]
        torch.testing.assert_close(reconstruction[row], alone)
        assert torch.isfinite(reconstruction[row]).all()
