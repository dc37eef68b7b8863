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


def write_raw(path, config, tensors, **meta_changes):
    """A file with our header around ``config`` (a dict or raw JSON text) and ``tensors``, without a content hash."""
    text = config if isinstance(config, str) else json.dumps(config)
    meta = {"format": "diffusion-sae", "format_version": "1", "config": text, **meta_changes}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def test_saved_files_carry_a_content_hash_and_a_flipped_byte_in_the_tensor_data_is_refused(tmp_path):
    path = tmp_path / "d.safetensors"
    save_dictionary(trained_looking_sae(), path)
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert b'"content_sha256":"' in data[:header_end]
    data[header_end + 100] ^= 0x01  # inside W_dec: still a finite float, so only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(DictionaryError, match="d.safetensors is corrupted \\(content hash mismatch\\); re-download or re-save it"):
        load_native(path)


def test_the_content_hash_covers_the_config_too(tmp_path):
    path = tmp_path / "d.safetensors"
    save_dictionary(trained_looking_sae(), path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"double_blocks.18", b"double_blocks.19", 1))
    with pytest.raises(DictionaryError, match="corrupted \\(content hash mismatch\\)"):
        load_native(path)


def test_files_without_a_content_hash_still_load(tmp_path):
    sae = trained_looking_sae()
    write_raw(tmp_path / "old.safetensors", sae.config(), sae.state_dict())
    loaded = load_native(tmp_path / "old.safetensors")
    assert loaded.config() == sae.config()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("change, message", [
    ({"k": True}, "k=True is not a whole number"),
    ({"k": 3.7}, "k=3.7 is not a whole number"),
    ({"k": 3.0}, "k=3.0 is not a whole number"),
    ({"k": "3"}, "k='3' is not a whole number"),
    ({"k": 0}, "k=0 must be between 1 and n_latents=32"),
    ({"k": None}, "k=None is not a whole number"),
    ({"d_in": "8"}, "d_in='8' is not a whole number"),
    ({"n_latents": -32}, "n_latents=-32 must be between 1 and"),
    ({"subtract_decoder_bias": "false"}, "subtract_decoder_bias='false' is not true or false"),
    ({"metadata": [1]}, "metadata=\\[1\\] is not a JSON object"),
    ({"site": "flux"}, "a site record must be a JSON object"),
    ({"site": {**SITE.to_dict(), "timestep_window": [0.9, 0.1]}}, "timestep_window=\\[0.9, 0.1\\] is not null or \\[start, end\\]"),
    ({"site": {**SITE.to_dict(), "family": 5}}, "site family=5 is not a string"),
])
def test_header_fields_of_the_wrong_type_or_range_are_refused_not_coerced(tmp_path, change, message):
    sae = trained_looking_sae()
    write_raw(tmp_path / "d.safetensors", {**json.loads(json.dumps(sae.config())), **change}, sae.state_dict())
    with pytest.raises(DictionaryError, match=f"d.safetensors: the dictionary header is damaged \\(.*{message}") as raised:
        load_native(tmp_path / "d.safetensors")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("field", ["k", "d_in", "n_latents", "site", "metadata", "subtract_decoder_bias", "kind"])
def test_missing_header_fields_are_refused_not_defaulted(tmp_path, field):
    sae = trained_looking_sae()
    config = {k: v for k, v in sae.config().items() if k != field}
    write_raw(tmp_path / "d.safetensors", config, sae.state_dict())
    with pytest.raises(DictionaryError, match=f"the dictionary header is damaged \\('{field}' is missing\\)"):
        load_native(tmp_path / "d.safetensors")


def test_deeply_nested_header_json_is_refused(tmp_path):
    sae = trained_looking_sae()
    text = json.dumps(sae.config())[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    write_raw(tmp_path / "d.safetensors", text, sae.state_dict())
    with pytest.raises(DictionaryError, match="the dictionary header is damaged \\(maximum recursion depth"):
        load_native(tmp_path / "d.safetensors")


def test_a_small_file_claiming_a_huge_dictionary_is_refused_before_allocating(tmp_path):
    resource = pytest.importorskip("resource")
    sae = trained_looking_sae()
    write_raw(tmp_path / "d.safetensors", {**sae.config(), "n_latents": 10**8}, sae.state_dict())
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DictionaryError, match="tensor 'W_dec' has shape \\(32, 8\\) but the header \\(d_in=8, n_latents=100000000\\) needs \\(100000000, 8\\)"):
        load_native(tmp_path / "d.safetensors")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 500_000  # kB: the 6.4 GB module was never built


@pytest.mark.parametrize("name, dtype", [("W_enc", torch.float64), ("b_dec", torch.float16), ("threshold", torch.int64)])
def test_tensors_of_another_dtype_are_refused(tmp_path, name, dtype):
    sae = trained_looking_sae()
    tensors = {**sae.state_dict(), name: sae.state_dict()[name].to(dtype)}
    write_raw(tmp_path / "d.safetensors", sae.config(), tensors)
    with pytest.raises(DictionaryError, match=f"tensor '{name}' is stored as .* but dictionaries keep it as F32"):
        load_native(tmp_path / "d.safetensors")


@pytest.mark.parametrize("std", [0.0, -1.0])
def test_an_input_std_that_is_zero_or_negative_is_refused(tmp_path, std):
    sae = trained_looking_sae()
    tensors = dict(sae.state_dict())
    tensors["standardizer.std"] = tensors["standardizer.std"].clone()
    tensors["standardizer.std"][2] = std
    write_raw(tmp_path / "d.safetensors", sae.config(), tensors)
    with pytest.raises(DictionaryError, match="the input statistics have 1 zero, negative or non-finite std entries"):
        load_native(tmp_path / "d.safetensors")


def test_unknown_and_missing_tensors_are_named(tmp_path):
    sae = trained_looking_sae()
    tensors = dict(sae.state_dict())
    tensors["W_encoder"] = tensors.pop("W_enc")
    write_raw(tmp_path / "d.safetensors", sae.config(), tensors)
    with pytest.raises(DictionaryError, match="not those of a topk dictionary \\(missing W_enc; unexpected W_encoder\\)"):
        load_native(tmp_path / "d.safetensors")


def test_read_header_validates_the_header_too(tmp_path):
    sae = trained_looking_sae()
    write_raw(tmp_path / "d.safetensors", {**sae.config(), "k": "three"}, sae.state_dict())
    with pytest.raises(DictionaryError, match="k='three' is not a whole number"):
        read_header(tmp_path / "d.safetensors")


def test_a_header_entry_of_an_unknown_name_is_refused_so_a_damaged_hash_key_cannot_switch_the_check_off(tmp_path):
    sae = trained_looking_sae()
    save_dictionary(sae, tmp_path / "d.safetensors")
    data = (tmp_path / "d.safetensors").read_bytes().replace(b'"content_sha256"', b'"content_sha257"', 1)
    (tmp_path / "d.safetensors").write_bytes(data)
    with pytest.raises(DictionaryError, match="the dictionary header has unknown entries \\(content_sha257\\)"):
        load_native(tmp_path / "d.safetensors")


def test_the_hash_cost_benchmark_reports_save_and_load_with_and_without_the_hash(capsys):
    from bench.hash_cost import main

    rows = main(["--small", "--iters", "1"])
    assert [r["name"] for r in rows] == ["hash alone", "save with hash", "save without hash", "load with hash", "load without hash"]
    assert all(r["seconds"] > 0 for r in rows)
