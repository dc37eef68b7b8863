"""ITDA: real activations as atoms, gradient pursuit to a target L0, online growth."""
import pytest
import torch

from sae_core.errors import ConfigError, DictionaryError, ShardError
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


def test_gradient_pursuit_never_gives_negative_weights():
    atoms = orthonormal_atoms(6, 8)
    values, _ = gradient_pursuit(-atoms[:2] + 0.1 * atoms[2:4], atoms, 3)
    assert bool((values >= 0).all())
    assert float(values.max()) == pytest.approx(0.1, abs=1e-5)  # only the positive part is explained


def test_gradient_pursuit_uses_at_most_the_atoms_it_has_and_zeros_without_any():
    atoms = orthonormal_atoms(2, 8)
    assert gradient_pursuit(torch.randn(5, 8), atoms, 4).values.shape == (5, 2)
    values, indices = gradient_pursuit(torch.randn(5, 8), atoms[:0], 4)
    assert values.shape == (5, 4) and not values.any() and not indices.any()


def test_codes_have_the_target_l0_distinct_atoms_and_any_leading_shape():
    itda = ITDA(16, 3)
    itda.grow(torch.randn(40, 16))
    assert itda.n_latents > 3
    codes = itda.encode(torch.randn(2, 5, 16))
    assert codes.values.shape == codes.indices.shape == (2, 5, 3)
    assert all(len(set(row.tolist())) == 3 for row in codes.indices.reshape(-1, 3))
    assert itda.decode(codes).shape == (2, 5, 16)
    assert itda.dense_codes(torch.randn(2, 5, 16)).shape == (2, 5, itda.n_latents)


def test_a_poorly_reconstructed_input_is_added_and_a_well_reconstructed_one_is_not():
    itda = ITDA(8, 2, loss_threshold=0.3)
    base = torch.eye(8)[:2] * 5
    assert itda.grow(base)["added"] == 2
    assert itda.grow(base[:1] * 0.5 + base[1:] * 0.25)["added"] == 0  # spanned by existing atoms
    stats = itda.grow(torch.eye(8)[5:6])
    assert stats["added"] == 1 and stats["loss"] == pytest.approx(1.0)
    torch.testing.assert_close(itda.atoms[-1], torch.eye(8)[5])  # stored at unit norm


def test_a_zero_input_is_never_added():
    itda = ITDA(8, 2)
    stats = itda.grow(torch.zeros(3, 8))
    assert (stats["added"], stats["candidates"], stats["loss"], stats["full"]) == (0, 0, 0.0, False)


def test_duplicates_within_one_batch_are_added_once():
    itda = ITDA(8, 2, loss_threshold=0.3)
    v = torch.randn(1, 8)
    stats = itda.grow(torch.cat([v, 2 * v, v * 1.01]))
    assert stats["candidates"] == 3 and stats["added"] == 1


def test_duplicates_spread_over_a_large_batch_are_added_once_each():
    directions = orthonormal_atoms(3, 8)
    x = directions.repeat(1000, 1) * torch.rand(3000, 1).add(0.5)
    assert ITDA(8, 2).grow(x)["added"] == 3


def test_the_dictionary_stops_growing_at_max_atoms_and_says_so():
    itda = ITDA(32, 2, loss_threshold=0.1, max_atoms=5)
    stats = itda.grow(orthonormal_atoms(20, 32))
    assert itda.n_latents == 5 and stats["added"] == 5 and stats["full"] is True
    assert itda.grow(orthonormal_atoms(20, 32, seed=1))["added"] == 0
    for name in ("atoms", "sample_id", "token", "timestep", "firing_frequency", "mean_activation"):
        assert getattr(itda, name).shape[0] == 5, name


def test_atoms_remember_where_they_came_from():
    itda = ITDA(8, 1, loss_threshold=0.5)
    x = torch.eye(8)[:3]
    itda.grow(x, {"sample_id": torch.tensor([7, 8, 9]), "token": torch.tensor([0, 1, 2]),
                  "timestep": torch.tensor([0.5, 0.5, 0.9])})
    assert sorted(itda.sample_id.tolist()) == [7, 8, 9]
    order = itda.sample_id.argsort()
    assert itda.token[order].tolist() == [0, 1, 2]
    assert itda.timestep[order].tolist() == pytest.approx([0.5, 0.5, 0.9])


def test_missing_provenance_is_unknown_and_a_single_value_applies_to_every_row():
    itda = ITDA(8, 1)
    itda.grow(torch.eye(8)[:2], {"timestep": torch.tensor(0.25)})
    assert itda.sample_id.tolist() == [-1, -1] and itda.token.tolist() == [-1, -1]
    assert itda.timestep.tolist() == [0.25, 0.25]
    assert itda.firing_frequency.shape == itda.mean_activation.shape == (2,)


def test_provenance_that_does_not_fit_the_batch_is_a_clear_error():
    itda = ITDA(8, 1)
    with pytest.raises(ShardError, match="'token' has 2 values for 3 activations"):
        itda.grow(torch.eye(8)[:3], {"token": torch.tensor([0, 1])})
    with pytest.raises(ShardError, match="unknown ITDA provenance step"):
        itda.grow(torch.eye(8)[:3], {"step": torch.tensor([0, 1, 2])})
    assert itda.n_latents == 0


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
    itda = ITDA(8, 2, loss_threshold=0.2, max_atoms=100, standardizer=std)
    itda.grow(torch.randn(30, 8) * 3, {"sample_id": torch.arange(30)})  # token and timestep unknown (-1)
    itda.metadata["note"] = "grown in a test"
    save_dictionary(itda, tmp_path / "itda.safetensors")
    loaded = load_native(tmp_path / "itda.safetensors")
    assert isinstance(loaded, ITDA) and loaded.config() == itda.config()
    for name, tensor in itda.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(6, 8) * 3
    assert torch.equal(loaded.encode(x).indices, itda.encode(x).indices)
    torch.testing.assert_close(loaded(x), itda(x), rtol=0, atol=0)


def test_directions_are_in_model_space():
    std = Standardizer(4, std=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    itda = ITDA(4, 1, standardizer=std)
    itda.grow(torch.tensor([[0.0, 0.0, 6.0, 0.0]]))
    torch.testing.assert_close(itda.direction(0), torch.tensor([0.0, 0.0, 3.0, 0.0]))
    torch.testing.assert_close(itda.direction(0, unit=True), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    with pytest.raises(DictionaryError, match=r"feature 1 is out of range.*\(0\.\.0\)"):
        itda.direction(1)


def test_wrong_width_and_bad_settings_are_clear_errors():
    itda = ITDA(8, 2)
    with pytest.raises(DictionaryError, match="width 5 .*d_in=8"):
        itda.encode(torch.randn(2, 5))
    with pytest.raises(DictionaryError, match="width 5 .*d_in=8"):
        itda.grow(torch.randn(2, 5))
    with pytest.raises(ConfigError, match="target_l0=0"):
        ITDA(8, 0)
    with pytest.raises(ConfigError, match="loss_threshold=1.5"):
        ITDA(8, 2, loss_threshold=1.5)
    with pytest.raises(ConfigError, match="loss_threshold=0"):
        ITDA(8, 2, loss_threshold=0)


def test_an_empty_dictionary_encodes_to_zeros_and_reconstructs_the_mean():
    std = Standardizer(4, mean=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    itda = ITDA(4, 2, standardizer=std)
    x = torch.randn(3, 4)
    codes = itda.encode(x)
    assert codes.values.shape == (3, 2) and not codes.values.any()
    torch.testing.assert_close(itda(x), std.mean.expand(3, 4))


@pytest.mark.parametrize("change, message", [
    ({"k": 3}, "k=3 contradicts target_l0=2"),
    ({"target_l0": 2.5}, "target_l0=2.5 is not a whole number"),
    ({"loss_threshold": 0}, "loss_threshold=0 must be in \\(0, 1\\]"),
    ({"loss_threshold": "0.2"}, "loss_threshold='0.2' is not a finite number"),
    ({"max_atoms": None}, "max_atoms=None is not a whole number"),
])
def test_a_header_whose_settings_are_wrong_or_contradict_is_refused(change, message):
    config = {**ITDA(8, 2, loss_threshold=0.2).config(), **change}
    with pytest.raises(DictionaryError, match=message):
        ITDA.from_config(config)


def test_either_of_k_and_target_l0_stands_for_both():
    config = ITDA(8, 2).config()
    for missing in ("k", "target_l0"):
        assert ITDA.from_config({k: v for k, v in config.items() if k != missing}).target_l0 == 2
    with pytest.raises(DictionaryError, match="'target_l0' is missing"):
        ITDA.from_config({k: v for k, v in config.items() if k not in ("k", "target_l0")})
