"""ITDA: real activations as atoms, gradient pursuit to a target L0, online growth."""
import pytest
import torch

from sae_core.errors import DictionaryError
from sae_core.fileformat import load_native, save_dictionary
from sae_core.itda import ITDA, gradient_pursuit
from sae_core.metrics import evaluate
from sae_core.normalize import Standardizer


def orthonormal_atoms(m, d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


def test_gradient_pursuit_recovers_a_sparse_nonnegative_combination():
    atoms = orthonormal_atoms(12, 16)
    weights = torch.tensor([[2.0, 0.5, 1.5], [0.3, 3.0, 1.0]])
    support = torch.tensor([[1, 4, 9], [0, 11, 5]])
    x = torch.einsum("ns,nsd->nd", weights, atoms[support])
    values, indices = gradient_pursuit(x, atoms, 3)
    recon = torch.einsum("ns,nsd->nd", values, atoms[indices])
    assert float((recon - x).norm() / x.norm()) < 1e-4
    assert bool((values >= 0).all())
    for row in range(2):
        assert set(indices[row].tolist()) == set(support[row].tolist())


def test_codes_have_the_target_l0_and_any_leading_shape():
    itda = ITDA(16, 3, n_atoms=0)
    itda.grow(torch.randn(40, 16))
    codes = itda.encode(torch.randn(2, 5, 16))
    assert codes.values.shape == (2, 5, 3)
    assert itda.decode(codes).shape == (2, 5, 16)


def test_a_poorly_reconstructed_input_is_added_and_a_well_reconstructed_one_is_not():
    itda = ITDA(8, 2, loss_threshold=0.3)
    base = torch.eye(8)[:2] * 5
    assert itda.grow(base)["added"] == 2
    assert itda.grow(base[:1] * 0.5 + base[1:] * 0.25)["added"] == 0  # spanned by existing atoms
    assert itda.grow(torch.eye(8)[5:6])["added"] == 1


def test_duplicates_within_one_batch_are_added_once():
    itda = ITDA(8, 2, loss_threshold=0.3)
    v = torch.randn(1, 8)
    stats = itda.grow(torch.cat([v, 2 * v, v * 1.01]))
    assert stats["candidates"] == 3 and stats["added"] == 1


def test_the_dictionary_stops_growing_at_max_atoms_and_says_so():
    itda = ITDA(32, 2, loss_threshold=0.1, max_atoms=5)
    stats = itda.grow(orthonormal_atoms(20, 32))
    assert itda.n_latents == 5 and stats["full"] is True


def test_atoms_remember_where_they_came_from():
    itda = ITDA(8, 1, loss_threshold=0.5)
    x = torch.eye(8)[:3]
    itda.grow(x, {"sample_id": torch.tensor([7, 8, 9]), "token": torch.tensor([0, 1, 2]),
                  "timestep": torch.tensor([0.5, 0.5, 0.9])})
    assert sorted(itda.sample_id.tolist()) == [7, 8, 9]
    order = itda.sample_id.argsort()
    assert itda.token[order].tolist() == [0, 1, 2]
    assert itda.timestep[order].tolist() == pytest.approx([0.5, 0.5, 0.9])


def test_growth_on_data_from_few_directions_reaches_low_fvu():
    directions = orthonormal_atoms(10, 24, seed=3)
    gen = torch.Generator().manual_seed(1)
    coeffs = torch.rand(2000, 10, generator=gen) * (torch.rand(2000, 10, generator=gen) < 0.2)
    x = coeffs @ directions + 0.01 * torch.randn(2000, 24, generator=gen)
    itda = ITDA(24, 4, loss_threshold=0.2)
    for chunk in x[:1500].split(250):
        itda.grow(chunk)
    assert evaluate(itda, x[1500:])["fvu"] < 0.2


def test_save_and_load_round_trip_keeps_atoms_stats_and_codes(tmp_path):
    std = Standardizer(8, mean=torch.randn(8), std=torch.rand(8) + 0.5)
    itda = ITDA(8, 2, loss_threshold=0.2, standardizer=std)
    itda.grow(torch.randn(30, 8) * 3, {"sample_id": torch.arange(30)})
    save_dictionary(itda, tmp_path / "itda.safetensors")
    loaded = load_native(tmp_path / "itda.safetensors")
    x = torch.randn(6, 8) * 3
    assert torch.equal(loaded.encode(x).indices, itda.encode(x).indices)
    torch.testing.assert_close(loaded(x), itda(x), rtol=0, atol=0)
    assert loaded.loss_threshold == 0.2 and torch.equal(loaded.sample_id, itda.sample_id)


def test_directions_are_in_model_space():
    std = Standardizer(4, std=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    itda = ITDA(4, 1, standardizer=std)
    itda.grow(torch.tensor([[0.0, 0.0, 6.0, 0.0]]))
    torch.testing.assert_close(itda.direction(0), torch.tensor([0.0, 0.0, 3.0, 0.0]))


def test_wrong_width_and_bad_settings_are_clear_errors():
    itda = ITDA(8, 2)
    with pytest.raises(DictionaryError, match="width 5 .*d_in=8"):
        itda.encode(torch.randn(2, 5))
    with pytest.raises(DictionaryError, match="target_l0=0"):
        ITDA(8, 0)
    with pytest.raises(DictionaryError, match="loss_threshold=1.5"):
        ITDA(8, 2, loss_threshold=1.5)


def test_an_empty_dictionary_reconstructs_the_mean():
    std = Standardizer(4, mean=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    itda = ITDA(4, 2, standardizer=std)
    x = torch.randn(3, 4)
    torch.testing.assert_close(itda(x), std.mean.expand(3, 4))
