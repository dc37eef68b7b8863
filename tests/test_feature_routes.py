"""The feature browser's routes on a real ComfyUI server: pages of features, a feature's record, its pictures,
and nothing read or named outside ``models/sae``."""
from __future__ import annotations

import json
import random
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import comfyui_harness
from sae_core import DictionaryConfig, TrainConfig, save_dictionary, train_dictionary
from sae_core.feature_index import DictionaryIdentity, FeatureIndexBuilder, index_folder_for

WORDS = ["red", "blue", "green", "circle", "square", "seven", "giraffe", "cat"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_dictionary(path: Path, seed: int):
    acts = torch.randn(512, 16, generator=torch.Generator().manual_seed(seed))
    config = TrainConfig(DictionaryConfig(kind="topk", k=4, n_latents=32), total_steps=5, batch_size=128,
                         warmup_steps=1)
    dictionary = train_dictionary(acts, config).dictionary
    save_dictionary(dictionary, path)
    return dictionary


def build_index(dictionary, path: Path, n_images: int = 24) -> Path:
    """An index of random 4x4-token images whose prompts pair two words, as a generation would feed it."""
    folder = index_folder_for(path)
    builder = FeatureIndexBuilder(folder, DictionaryIdentity.of(dictionary, path), top_m=4)
    rng, gen = random.Random(0), torch.Generator().manual_seed(1)
    for i in range(n_images):
        tokens = torch.randn(16, dictionary.d_in, generator=gen)
        with torch.no_grad():
            codes = dictionary.encode(tokens)
        image = np.asarray(torch.randint(0, 255, (32, 32, 3), generator=gen, dtype=torch.uint8))
        builder.add(image, " ".join(rng.sample(WORDS, 2)), codes, (4, 4), progress=0.5, seed=i)
    builder.finish()
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        comfyui_harness.find_comfyui_dir()
    except comfyui_harness.ComfyUINotFound as error:
        pytest.skip(str(error))
    base = tmp_path_factory.mktemp("comfyui-routes")
    sae = base / "models" / "sae"
    sae.mkdir(parents=True)
    indexed = tiny_dictionary(sae / "indexed.safetensors", seed=0)
    build_index(indexed, sae / "indexed.safetensors")
    tiny_dictionary(sae / "bare.safetensors", seed=1)
    damaged = tiny_dictionary(sae / "damaged.safetensors", seed=3)
    (build_index(damaged, sae / "damaged.safetensors") / "features" / "00000.json").write_text("{not json")
    outside = base / "outside"
    outside.mkdir()
    secret = tiny_dictionary(outside / "secret.safetensors", seed=2)
    build_index(secret, outside / "secret.safetensors")
    with comfyui_harness.comfyui_server(base) as url:
        yield url, base


def get(url: str, path: str, **params) -> tuple[int, bytes, str]:
    query = urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(f"{url}/diffusion_sae/{path}?{query}", timeout=30) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type", "")


def get_json(url: str, path: str, **params) -> tuple[int, dict]:
    status, body, _ = get(url, path, **params)
    return status, json.loads(body)


def test_the_dictionary_list_names_each_models_sae_file_and_whether_it_has_an_index(server):
    url, _ = server
    status, answer = get_json(url, "dictionaries")
    assert status == 200
    rows = {row["name"]: row for row in answer["dictionaries"]}
    assert {"indexed.safetensors", "bare.safetensors"} <= set(rows)
    assert not any(".features" in name for name in rows)  # an index's own files are not dictionaries
    assert rows["indexed.safetensors"]["indexed"] and not rows["bare.safetensors"]["indexed"]
    assert rows["indexed.safetensors"]["n_latents"] == 32 and rows["indexed.safetensors"]["kind"] == "topk"
    assert rows["organism_flux_db1_image.safetensors"]["site"] == "double_blocks.1:image"  # shipped with the plugin


def test_features_come_in_pages_sorted_as_asked_and_searchable_by_word(server):
    url, _ = server
    status, first = get_json(url, "features", dictionary="indexed.safetensors", offset=0, limit=5, sort="frequency")
    assert status == 200 and first["total"] == 32 and len(first["features"]) == 5
    frequencies = [row["frequency"] for row in first["features"]]
    assert frequencies == sorted(frequencies, reverse=True)
    _, second = get_json(url, "features", dictionary="indexed.safetensors", offset=5, limit=5, sort="frequency")
    assert not {r["id"] for r in first["features"]} & {r["id"] for r in second["features"]}
    _, by_id = get_json(url, "features", dictionary="indexed.safetensors", offset=30, limit=10, sort="id")
    assert [row["id"] for row in by_id["features"]] == [30, 31]
    word = next(w for row in first["features"] for w in row["words"])
    _, found = get_json(url, "features", dictionary="indexed.safetensors", q=word, limit=64)
    assert found["total"] >= 1 and all(word in row["words"] or word in (row["label"] or "")
                                       for row in found["features"])


def test_a_feature_opens_with_its_record_tiles_and_charts(server):
    url, _ = server
    _, page = get_json(url, "features", dictionary="indexed.safetensors", limit=1)
    feature = page["features"][0]["id"]
    status, record = get_json(url, "feature", dictionary="indexed.safetensors", id=feature)
    assert status == 200 and record["id"] == feature and record["top"] and len(record["histogram"]) > 1
    for path, params in [("tile", {"id": feature, "rank": 0}), ("chart", {"id": feature, "kind": "histogram"}),
                         ("chart", {"id": feature, "kind": "timesteps"})]:
        status, body, kind = get(url, path, dictionary="indexed.safetensors", **params)
        assert status == 200 and kind == "image/png" and body.startswith(PNG_MAGIC), (path, params)


@pytest.mark.parametrize("params", [
    {"id": "x"}, {"id": -1}, {"id": 32}, {"id": 0, "rank": 99}, {"id": 0, "kind": "pie"},
])
def test_bad_parameters_are_a_400_with_one_line(server, params):
    url, _ = server
    path = "chart" if "kind" in params else "tile" if "rank" in params else "feature"
    status, body, _ = get(url, path, dictionary="indexed.safetensors", **params)
    message = json.loads(body)["error"]
    assert status in (400, 404) and "\n" not in message


def test_a_damaged_index_is_a_one_line_error_that_names_no_server_folder(server):
    url, base = server
    status, answer = get_json(url, "feature", dictionary="damaged.safetensors", id=0)
    assert status == 400 and "damaged" in answer["error"] and "models/sae/damaged.features" in answer["error"]
    assert str(base) not in answer["error"] and "\n" not in answer["error"]


def test_a_dictionary_without_an_index_says_how_to_build_one(server):
    url, _ = server
    status, answer = get_json(url, "features", dictionary="bare.safetensors")
    assert status == 404 and "Build Feature Index" in answer["error"]


def test_nothing_outside_models_sae_is_read_or_named(server):
    url, base = server
    outside = base / "outside" / "secret.safetensors"
    for name in [str(outside), "../outside/secret.safetensors", "..", "/etc/passwd", "~", "indexed.safetensors/..",
                 "..%2Foutside%2Fsecret.safetensors"]:
        for path in ("features", "feature", "tile", "chart"):
            status, body, _ = get(url, path, dictionary=name, id=0, rank=0)
            text = body.decode(errors="replace")
            assert status == 404, (name, path, status)
            assert str(base) not in text.replace(name, ""), text
            assert "secret" not in text.replace(name, ""), text
