"""load_dictionary accepts every supported source and explains every failure."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_foreign_formats import write_saelens, write_sdlens, write_seed_itda, write_sparsify

from sae_core.errors import DictionaryError
from sae_core.fileformat import save_dictionary
from sae_core.itda import ITDA
from sae_core.loading import check_site_width, load_dictionary
from sae_core.sae import SparseAutoencoder
from sae_core.sites import Site


def native(folder, name="d.safetensors", seed=3):
    sae = SparseAutoencoder(8, 16, 2, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_dictionary(sae, folder / name)
    return sae, folder / name


def test_native_file_and_folder_with_one_native_file(tmp_path):
    sae, path = native(tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(load_dictionary(path)(x), sae(x))
    torch.testing.assert_close(load_dictionary(str(tmp_path))(x), sae(x))


def test_folder_with_several_native_files_asks_for_one(tmp_path):
    native(tmp_path, "a.safetensors")
    native(tmp_path, "b.safetensors")
    with pytest.raises(DictionaryError, match="holds 2 dictionaries; pass one file") as raised:
        load_dictionary(tmp_path)
    assert "a.safetensors" not in str(raised.value)
    assert load_dictionary(tmp_path / "b.safetensors").n_latents == 16


@pytest.mark.parametrize("write, picked_file, expected", [
    (write_saelens, "sae_weights.safetensors", "topk"),
    (write_sparsify, "sae.safetensors", "topk"),
    (write_sdlens, "state_dict.pth", "topk"),
    (write_seed_itda, "sae.safetensors", "itda"),
])
def test_each_layout_is_recognised_from_its_folder_or_one_of_its_files(tmp_path, write, picked_file, expected):
    write(tmp_path / "dictionary")
    for source in (tmp_path / "dictionary", tmp_path / "dictionary" / picked_file, tmp_path / "dictionary" / "cfg.json"):
        if source.exists():
            dictionary = load_dictionary(source)
            assert dictionary.kind == expected and isinstance(dictionary, ITDA if expected == "itda" else SparseAutoencoder)
            assert dictionary.site.extra["source"] in ("saelens", "sparsify", "sdlens", "seed-itda")


def test_folder_with_unknown_files_names_the_expected_layouts_but_not_its_contents(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DictionaryError, match="no dictionary layout recognised; expected .*SAELens") as raised:
        load_dictionary(tmp_path)
    assert "notes.txt" not in str(raised.value) and "weights.bin" not in str(raised.value)
    (tmp_path / "block_3").mkdir()
    with pytest.raises(DictionaryError, match="no dictionary layout recognised; .*pass one of those") as raised:
        load_dictionary(tmp_path)
    assert "block_3" not in str(raised.value)


def test_bare_pickle_file_is_refused_with_the_accepted_layouts(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "sae.pt")
    with pytest.raises(DictionaryError, match="a lone .pt file is not a dictionary layout.*config.json \\+ state_dict.pth"):
        load_dictionary(tmp_path / "sae.pt")


def test_foreign_safetensors_file_outside_a_known_layout_is_named(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DictionaryError, match="other.safetensors is a safetensors file but not a Diffusion SAE dictionary"):
        load_dictionary(tmp_path / "other.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("via_folder", [False, True])
def test_damaged_native_file(tmp_path, damage, via_folder):
    _, path = native(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 50)
    with pytest.raises(DictionaryError, match="d.safetensors is truncated or not a valid safetensors file.*re-download or re-save"):
        load_dictionary(tmp_path if via_folder else path)


def rewrite_header(sae, path, tensors=None, **config_changes):
    tensors = tensors or {k: v.clone().contiguous() for k, v in sae.state_dict().items()}
    meta = {"format": "diffusion-sae", "format_version": "1", "config": json.dumps({**sae.config(), **config_changes})}
    save_file(tensors, str(path), metadata=meta)


def test_nan_weights_in_a_file_are_named(tmp_path):
    sae, path = native(tmp_path)
    tensors = {k: v.clone().contiguous() for k, v in sae.state_dict().items()}
    tensors["W_enc"][0, 0] = float("nan")
    rewrite_header(sae, path, tensors)
    with pytest.raises(DictionaryError, match="d.safetensors: tensor 'W_enc' contains NaN"):
        load_dictionary(path)


def test_unknown_kind_in_the_header_is_named(tmp_path):
    sae, path = native(tmp_path)
    rewrite_header(sae, path, kind="gated")
    with pytest.raises(DictionaryError, match="unknown dictionary kind 'gated'; this version reads topk"):
        load_dictionary(path)


def test_missing_paths(tmp_path, monkeypatch):
    with pytest.raises(DictionaryError, match="nope.safetensors: no such file or folder"):
        load_dictionary(tmp_path / "nope.safetensors")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DictionaryError, match="models/sae/x.safetensors: no such file or folder"):
        load_dictionary("models/sae/x.safetensors")  # looks like owner/name/file, but it is a path
    with pytest.raises(DictionaryError, match="owner/name: no such file or folder"):
        load_dictionary(Path("owner/name"))  # a Path is never a Hub id
    with pytest.raises(DictionaryError, match="no dictionary given"):
        load_dictionary("  ")


# --- Hub ids, answered from a fake HF cache with HF_HUB_OFFLINE=1 -----------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_repo(cache, repo, sub, make):
    """The cache layout huggingface_hub reads: refs/<branch> holds the commit, snapshots/<commit>/ the files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    target = folder / "snapshots" / COMMIT / sub
    target.mkdir(parents=True)
    make(target)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline HF cache. huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE into
    ``huggingface_hub.constants`` at import and consults those attributes at call time
    (2.x: ``constants.is_offline_mode()``), so both the environment and the constants are set."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_resolves_from_the_local_cache_when_offline(hub_cache):
    sae = SparseAutoencoder(8, 16, 2, seed=5)
    fake_hub_repo(hub_cache, "someone/flux-saes", "db18", lambda d: save_dictionary(sae, d / "sae.safetensors"))
    x = torch.randn(2, 8)
    torch.testing.assert_close(load_dictionary("hf://someone/flux-saes/db18")(x), sae(x))
    torch.testing.assert_close(load_dictionary("someone/flux-saes/db18@main")(x), sae(x))
    torch.testing.assert_close(load_dictionary("someone/flux-saes/db18", revision=COMMIT)(x), sae(x))
    torch.testing.assert_close(load_dictionary("hf://someone/flux-saes/db18/sae.safetensors")(x), sae(x))


def test_hub_subfolder_in_a_foreign_layout(hub_cache):
    fake_hub_repo(hub_cache, "someone/sdxl-saes", "unet/mid_block", lambda d: write_saelens(d, "jumprelu"))
    assert load_dictionary("hf://someone/sdxl-saes/unet/mid_block").kind == "jumprelu"


def test_hub_id_missing_offline_gives_the_fix(hub_cache):
    with pytest.raises(DictionaryError, match="could not fetch someone/absent/sub from the Hugging Face Hub .*HF_HUB_OFFLINE=1.*local Hugging Face cache.*local path") as raised:
        load_dictionary("hf://someone/absent/sub")
    assert str(hub_cache) not in str(raised.value)  # a server's error names no folder of the server


def test_hub_id_with_a_missing_subfolder_or_contradicting_revisions(hub_cache):
    fake_hub_repo(hub_cache, "someone/flux-saes", "db18", lambda d: native(d))
    with pytest.raises(DictionaryError, match="someone/flux-saes has no 'db19'; check the name"):
        load_dictionary("hf://someone/flux-saes/db19")
    with pytest.raises(DictionaryError, match="revision 'v2' contradicts the id's @main"):
        load_dictionary("hf://someone/flux-saes/db18@main", revision="v2")


def test_width_check_names_both_widths():
    sae = SparseAutoencoder(8, 16, 2, site=Site(family="flux", block="double_blocks.3", stream="image"))
    check_site_width(sae, 8, "flux:double_blocks.3:image")
    with pytest.raises(DictionaryError, match="dictionary flux:double_blocks.3:image has d_in=8 but site flux:double_blocks.4:image has width 3072"):
        check_site_width(sae, 3072, "flux:double_blocks.4:image")


# --- choosing a file never loads another one; Hub-only loading ---------------------------------


def test_a_headerless_safetensors_file_beside_a_dictionary_is_refused_not_replaced_by_it(tmp_path):
    native(tmp_path, "dictionary.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "image_model.safetensors"))
    with pytest.raises(DictionaryError, match="image_model.safetensors is a safetensors file but not a Diffusion SAE dictionary"):
        load_dictionary(tmp_path / "image_model.safetensors")


def test_a_file_that_is_not_part_of_the_folders_foreign_layout_is_refused(tmp_path):
    write_saelens(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "sparsity.safetensors"))
    with pytest.raises(DictionaryError, match="sparsity.safetensors is a safetensors file but not a Diffusion SAE dictionary"):
        load_dictionary(tmp_path / "sparsity.safetensors")
    assert load_dictionary(tmp_path / "sae_weights.safetensors").kind == "topk"


@pytest.mark.parametrize("source", [
    "~", "/etc", "/tmp/x/y", "../models/x", "owner/..", "owner/name/../../x", "./owner/name", ".hidden/name",
    "owner//name", "owner/name/", "C:/models/x", "C:\\models\\x", "owner\\name", "owner", "hf://", "hf://owner",
    "owner/name@", "owner/name@../x", "owner/na me", "owner/name\nsecond line", "",
])
def test_hub_only_loading_refuses_anything_that_is_not_a_hub_id_and_echoes_only_it(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DictionaryError) as raised:
        load_dictionary(source, allow_local=False)
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path) not in message
    if source:
        assert message == f"{source!r} is not a Hub id (hf://owner/name[/subfolder]); local files must be put in models/sae and picked from the list"


def test_hub_only_loading_never_reads_a_local_folder_of_that_name(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    native(tmp_path / "owner" / "name")
    with pytest.raises(DictionaryError, match="could not fetch owner/name from the Hugging Face Hub .* or put the file in models/sae"):
        load_dictionary("owner/name", allow_local=False)
    assert load_dictionary("owner/name").n_latents == 16  # the CLI's default still reads local paths


def test_hub_only_loading_reads_hub_ids_from_the_cache(hub_cache):
    sae = SparseAutoencoder(8, 16, 2, seed=5)
    fake_hub_repo(hub_cache, "someone/flux-saes", "db18", lambda d: save_dictionary(sae, d / "sae.safetensors"))
    x = torch.randn(2, 8)
    for source in ("hf://someone/flux-saes/db18", "someone/flux-saes/db18@main", "someone/flux-saes/db18/sae.safetensors"):
        torch.testing.assert_close(load_dictionary(source, allow_local=False)(x), sae(x))


def test_a_revision_that_could_leave_the_cache_is_refused(hub_cache):
    with pytest.raises(DictionaryError, match="revision '../../x' is not a branch, tag or commit name"):
        load_dictionary("hf://someone/flux-saes/db18", revision="../../x", allow_local=False)


def test_a_home_folder_is_never_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "private-notes.txt").write_text("secret")
    with pytest.raises(DictionaryError) as raised:
        load_dictionary("~")
    assert "private-notes" not in str(raised.value)
    with pytest.raises(DictionaryError, match="^'~' is not a Hub id"):
        load_dictionary("~", allow_local=False)
