"""A dictionary file round-trips exactly, says what it is, and is never half-written."""
import errno
import json

import pytest
import torch
from safetensors.torch import save_file

from sae_core import atomic
from sae_core.errors import DictionaryError, WriteError
from sae_core.fileformat import load_native, read_header, save_dictionary
from sae_core.normalize import Standardizer
from sae_core.sae import SparseAutoencoder
from sae_core.sites import Site

SITE = Site("flux", "double_blocks.18", "image", (0.0, 0.5))


def trained_looking_sae(kind="topk"):
    std = Standardizer(8, mean=torch.randn(8), std=torch.rand(8) + 0.5)
    sae = SparseAutoencoder(8, 32, 3, kind, site=SITE, standardizer=std, seed=4)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.threshold.fill_(0.25)
        sae.firing_frequency.uniform_()
    sae.metadata = {"training": {"steps": 7}}
    return sae


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_save_then_load_gives_the_same_dictionary(tmp_path, kind):
    sae = trained_looking_sae(kind)
    save_dictionary(sae, tmp_path / "d.safetensors")
    loaded = load_native(tmp_path / "d.safetensors")
    x = torch.randn(10, 8) * 4
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)
    assert loaded.site == SITE and loaded.kind == kind and loaded.metadata == sae.metadata


def test_header_describes_the_dictionary_without_loading_tensors(tmp_path):
    save_dictionary(trained_looking_sae(), tmp_path / "d.safetensors")
    header = read_header(tmp_path / "d.safetensors")
    assert header["kind"] == "topk" and header["d_in"] == 8 and header["n_latents"] == 32 and header["k"] == 3
    assert header["site"]["block"] == "double_blocks.18" and header["site"]["timestep_window"] == [0.0, 0.5]


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "d.safetensors"
    save_dictionary(trained_looking_sae(), path)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "save_file", disk_full)
    with pytest.raises(WriteError, match="disk full while writing .*d.safetensors"):
        save_dictionary(trained_looking_sae(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_truncated_file_is_reported_with_the_fix(tmp_path):
    path = tmp_path / "d.safetensors"
    save_dictionary(trained_looking_sae(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DictionaryError, match="d.safetensors is truncated or not a valid safetensors file.*re-download or re-save"):
        load_native(path)


def test_nan_weights_are_refused_on_save_and_on_load(tmp_path):
    sae = trained_looking_sae()
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(DictionaryError, match="'W_dec' contains NaN"):
        save_dictionary(sae, tmp_path / "d.safetensors")
    good = trained_looking_sae()
    tensors = {k: v.clone() for k, v in good.state_dict().items()}
    tensors["b_enc"][3] = float("inf")
    meta = {"format": "diffusion-sae", "format_version": "1", "config": json.dumps(good.config())}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(DictionaryError, match="bad.safetensors: tensor 'b_enc' contains NaN or inf"):
        load_native(tmp_path / "bad.safetensors")


def test_unknown_kind_and_impossible_k_in_a_header_are_refused(tmp_path):
    good = trained_looking_sae()
    for change, message in [({"kind": "gated"}, "unknown dictionary kind 'gated'"),
                            ({"k": 99}, "k=99 must be between 1 and n_latents=32")]:
        meta = {"format": "diffusion-sae", "format_version": "1", "config": json.dumps({**good.config(), **change})}
        save_file({k: v.contiguous() for k, v in good.state_dict().items()}, str(tmp_path / "x.safetensors"), metadata=meta)
        with pytest.raises(DictionaryError, match=message):
            load_native(tmp_path / "x.safetensors")


def test_a_foreign_safetensors_file_is_named_as_such(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DictionaryError, match="not a Diffusion SAE dictionary"):
        load_native(tmp_path / "other.safetensors")


def test_only_safetensors_names_are_accepted_for_saving(tmp_path):
    with pytest.raises(DictionaryError, match="saved as .safetensors"):
        save_dictionary(trained_looking_sae(), tmp_path / "d.pt")
