"""load_dictionary accepts every supported source and explains every failure."""
import json

import pytest
import torch
from safetensors.torch import save_file

from sae_core import DictionaryError, SparseAutoencoder, load_dictionary, save_dictionary
from sae_core.loading import check_site_width


def native(tmp_path, name="d.safetensors"):
    sae = SparseAutoencoder(8, 16, 2, seed=3)
    save_dictionary(sae, tmp_path / name)
    return sae, tmp_path / name


def test_native_file_and_folder_with_one_native_file(tmp_path):
    sae, path = native(tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(load_dictionary(path)(x), sae(x))
    torch.testing.assert_close(load_dictionary(tmp_path)(x), sae(x))


def test_folder_with_unknown_files_lists_them(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DictionaryError, match="no dictionary layout recognised among notes.txt, weights.bin"):
        load_dictionary(tmp_path)


def test_bare_pickle_file_is_refused_with_the_accepted_layouts(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "sae.pt")
    with pytest.raises(DictionaryError, match="bare .pt file is not a dictionary layout"):
        load_dictionary(tmp_path / "sae.pt")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_native_file(tmp_path, damage):
    _, path = native(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 50)
    with pytest.raises(DictionaryError, match="truncated or not a valid safetensors file.*re-download or re-save"):
        load_dictionary(path)


def test_nan_weights_in_a_file_are_named(tmp_path):
    sae, path = native(tmp_path)
    tensors = {k: v.clone().contiguous() for k, v in sae.state_dict().items()}
    tensors["W_enc"][0, 0] = float("nan")
    meta = {"format": "diffusion-sae", "format_version": "1", "config": json.dumps(sae.config())}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DictionaryError, match="tensor 'W_enc' contains NaN"):
        load_dictionary(path)


def test_missing_path(tmp_path):
    with pytest.raises(DictionaryError, match="no such file or folder"):
        load_dictionary(tmp_path / "nope.safetensors")


def fake_hub_cache(cache, repo, sub, make):
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    target = folder / "snapshots" / commit / sub
    target.mkdir(parents=True)
    make(target)


def offline_cache(monkeypatch, cache):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_resolves_from_the_local_cache_when_offline(tmp_path, monkeypatch):
    sae = SparseAutoencoder(8, 16, 2, seed=5)
    fake_hub_cache(tmp_path / "hub", "someone/flux-saes", "db18", lambda d: save_dictionary(sae, d / "sae.safetensors"))
    offline_cache(monkeypatch, tmp_path / "hub")
    x = torch.randn(2, 8)
    torch.testing.assert_close(load_dictionary("hf://someone/flux-saes/db18")(x), sae(x))


def test_hub_id_missing_offline_gives_the_fix(tmp_path, monkeypatch):
    offline_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(DictionaryError, match="could not fetch someone/absent/sub .*local HF cache.*local path"):
        load_dictionary("hf://someone/absent/sub")


def test_width_check_names_both_widths():
    with pytest.raises(DictionaryError, match="d_in=8 but site flux:double_blocks.3:image has width 3072"):
        check_site_width(SparseAutoencoder(8, 16, 2), 3072, "flux:double_blocks.3:image")
