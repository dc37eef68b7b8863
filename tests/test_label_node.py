"""Label Features (nodes/label_nodes.py) in graphs run by ComfyUI's executor: prompt words, a vision-language model
behind a real local OpenAI-compatible server, and CLIP through ComfyUI's own CLIP classes, into the index's
labels.json, resumably, with failures as statuses and the API key kept out of everything the node writes.

The test indexes are built from solid-colour images: feature 0 fires on red squares, 1 on green, 2 on blue and
3 on yellow (the more images, the more frequent), so the fake server's colour answers are checkable. The CLIP
encoders are real ComfyUI ``ClipVisionModel`` / ``CLIP`` objects, tiny and with random weights (no CLIP weights
are available offline), so their labels are checked against the same encoders' embeddings, not for meaning.
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import fake_openai_server
from fake_openai_server import COLOURS, FakeOpenAIServer
from sae_core import SparseAutoencoder, save_dictionary
from sae_core.feature_index import DictionaryIdentity, FeatureIndexBuilder, index_folder_for, open_index
from sae_core.kernels import SparseCodes
from sae_core.labels import DEFAULT_VOCABULARY, clip_label
from sae_core.vlm import KEY_ENV

KEY = "sk-label-node-0123456789-secret"
FEATURE_COLOURS = ("red", "green", "blue", "yellow")
IMAGES_PER_FEATURE = (8, 7, 6, 5)
N_LATENTS = 8
GRID = (4, 4)
TEXT_WIDTH = 24
VOCABULARY = ("red", "green", "blue", "yellow", "cat", "dog", "tree", "car", "sky", "water", "stone", "face")
CLIP_CACHE: dict = {}


# ----------------------------------------------------------------------------- test-only nodes (tiny real CLIPs)


def tiny_clip_vision(projection: int):
    """A real ComfyUI ClipVisionModel (2 layers, 32 wide, 32 px input) whose image_embeds are ``projection`` wide."""
    import comfy.clip_vision

    config = Path(CLIP_CACHE["folder"]) / f"clip_vision_{projection}.json"
    config.write_text(json.dumps({
        "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
        "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
        "num_hidden_layers": 2, "patch_size": 16, "projection_dim": projection}))
    model = comfy.clip_vision.ClipVisionModel(str(config))
    randomize(model.model, seed=projection)
    return model


def tiny_clip():
    """A real ComfyUI CLIP text encoder with SD1.5's tokenizer: one layer, TEXT_WIDTH wide, projected pooled output."""
    import comfy.sd
    import comfy.sd1_clip

    class Target:
        params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": {
            "hidden_act": "quick_gelu", "hidden_size": TEXT_WIDTH, "intermediate_size": 48, "layer_norm_eps": 1e-5,
            "max_position_embeddings": 77, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 49408,
            "projection_dim": TEXT_WIDTH, "eos_token_id": 49407, "bos_token_id": 0, "pad_token_id": 1}}
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(Target())
    randomize(clip.cond_stage_model, seed=1)
    return clip


def randomize(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI allocates weights with torch.empty: give them seeded values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def cached(name: str, make):
    if name not in CLIP_CACHE:
        CLIP_CACHE[name] = make()
    return CLIP_CACHE[name]


class SAETestTinyClipVision:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"projection": ("INT", {"default": TEXT_WIDTH, "min": 1, "max": 64})}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, projection):
        return (cached(f"vision{projection}", lambda: tiny_clip_vision(projection)),)


class SAETestTinyClip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self):
        return (cached("text", tiny_clip),)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def comfy(comfyui, tmp_path_factory):
    comfyui.load_plugin_nodes()
    import folder_paths
    import nodes

    assert "SAELabelFeatures" in nodes.NODE_CLASS_MAPPINGS  # registered by the plugin's entry point
    nodes.NODE_CLASS_MAPPINGS["SAETestTinyClipVision"] = SAETestTinyClipVision
    nodes.NODE_CLASS_MAPPINGS["SAETestTinyClip"] = SAETestTinyClip
    sae_dir = tmp_path_factory.mktemp("label_sae")
    folder_paths.add_model_folder_path("sae", str(sae_dir), is_default=True)
    CLIP_CACHE["folder"] = tmp_path_factory.mktemp("tiny_clip")
    comfyui.sae_dir = sae_dir
    comfyui.label_node = nodes.NODE_CLASS_MAPPINGS["SAELabelFeatures"]
    yield comfyui
    CLIP_CACHE.clear()  # while ComfyUI can still unload the encoders' patchers


@pytest.fixture
def dictionary(comfy, request) -> str:
    """A fresh dictionary in models/sae with a colour index beside it; its name as the node lists it."""
    name = f"{request.node.name.split('[')[0][:40]}.safetensors"
    path = comfy.sae_dir / name
    sae = SparseAutoencoder(8, N_LATENTS, 1, seed=0)
    save_dictionary(sae, path)
    build_colour_index(sae, path)
    return name


def build_colour_index(sae, path: Path) -> Path:
    """Feature f fires on the first token of IMAGES_PER_FEATURE[f] squares of FEATURE_COLOURS[f] (slightly shaded
    apart, stronger for darker ones), so its heatmap tiles keep the square's colour; prompts name the colour.
    Features 4..7 never fire."""
    folder = index_folder_for(path)
    builder = FeatureIndexBuilder(folder, DictionaryIdentity.of(sae, path), top_m=8)
    tokens = GRID[0] * GRID[1]
    for feature, (colour, count) in enumerate(zip(FEATURE_COLOURS, IMAGES_PER_FEATURE)):
        for shade in range(count):
            pixels = np.full((16, 16, 3), [max(0, c - 5 * shade) for c in COLOURS[colour]], dtype=np.uint8)
            values = torch.zeros(tokens, 1)
            values[0] = 1.0 + 0.1 * shade
            codes = SparseCodes(values, torch.full((tokens, 1), feature))
            builder.add(pixels, f"a {colour} square", codes, GRID, progress=0.5, seed=shade)
    builder.finish()
    return folder


def label_graph(dictionary: str, source: str = "words", features: int = 0, clip_projection: int | None = None,
                **inputs) -> dict:
    values = {"dictionary": dictionary, "source": source, "vlm_url": "http://127.0.0.1:9/v1", "vlm_model": "",
              "vlm_key": "", "features": features, "vocabulary": "", **inputs}
    graph = {"1": {"class_type": "SAELabelFeatures", "inputs": values}}
    if clip_projection is not None:
        graph["2"] = {"class_type": "SAETestTinyClipVision", "inputs": {"projection": clip_projection}}
        graph["3"] = {"class_type": "SAETestTinyClip", "inputs": {}}
        values.update(clip_vision=["2", 0], clip=["3", 0])
    return graph


def run_node(comfy, graph: dict) -> str:
    """The summary the node shows."""
    history = comfy.execute_graph(graph)
    (summary,) = history["outputs"]["1"]["text"]
    return summary


def labels_json(comfy, dictionary: str) -> dict:
    return json.loads((index_folder_for(comfy.sae_dir / dictionary) / "labels.json").read_text())["features"]


def vlm_graph(dictionary: str, server: FakeOpenAIServer, **inputs) -> dict:
    return label_graph(dictionary, "vlm", vlm_url=server.base_url, vlm_model="fake-vlm", **inputs)


# ----------------------------------------------------------------------------- words


def test_words_source_labels_every_fired_feature_by_its_prompt_words(comfy, dictionary):
    summary = run_node(comfy, label_graph(dictionary))
    labels = labels_json(comfy, dictionary)
    assert sorted(labels, key=int) == ["0", "1", "2", "3"]  # the four that fired, not the silent 4..7
    for feature, colour in enumerate(FEATURE_COLOURS):
        entry = labels[str(feature)]["words"]
        assert entry["text"] == colour and entry["status"] == "ok" and 0.0 < entry["score"] <= 1.0
    assert summary.splitlines()[0] == f"words labels of {dictionary}: 4 ok, 0 failed, of 4 features"
    assert "#0 red (1.00)" in summary
    assert f"models/sae/{Path(dictionary).stem}.features/labels.json" in summary


def test_features_n_labels_the_n_most_frequent_and_a_later_run_adds_the_rest(comfy, dictionary):
    summary = run_node(comfy, label_graph(dictionary, features=2))
    assert sorted(labels_json(comfy, dictionary), key=int) == ["0", "1"]  # red (8 images) and green (7)
    assert "2 ok, 0 failed, of 2 features" in summary
    summary = run_node(comfy, label_graph(dictionary, features=0))
    assert sorted(labels_json(comfy, dictionary), key=int) == ["0", "1", "2", "3"]
    assert "this run labelled 2; 2 already had an ok words label" in summary


def test_a_rerun_with_nothing_left_keeps_comfyuis_cache_and_a_changed_labels_file_invalidates_it(comfy, dictionary):
    node = comfy.label_node
    before = node.fingerprint_inputs(dictionary=dictionary, source="words")
    run_node(comfy, label_graph(dictionary))
    labelled = node.fingerprint_inputs(dictionary=dictionary, source="words")
    assert labelled != before
    run_node(comfy, label_graph(dictionary))  # nothing to do: labels.json is not rewritten
    assert node.fingerprint_inputs(dictionary=dictionary, source="words") == labelled


# ----------------------------------------------------------------------------- a vision-language model


def test_vlm_labels_each_feature_with_the_colour_of_its_images_and_scores_it(comfy, dictionary, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "the-environment-key-not-this-one")
    with FakeOpenAIServer() as server:
        summary = run_node(comfy, vlm_graph(dictionary, server, vlm_key=KEY))
    labels = labels_json(comfy, dictionary)
    for feature, colour in enumerate(FEATURE_COLOURS):
        entry = labels[str(feature)]["vlm"]
        assert (entry["text"], entry["status"], entry["score"]) == (f"A {colour} square", "ok", 1.0)
    assert len(server.requests) == 8  # per feature: describe, then judge the held-out images among others'
    assert {request.headers["authorization"] for request in server.requests} == {f"Bearer {KEY}"}  # widget first
    assert "vlm labels of" in summary and "4 ok, 0 failed, of 4 features" in summary
    assert "#0 A red square (1.00)" in summary
    assert KEY not in summary
    assert KEY not in (index_folder_for(comfy.sae_dir / dictionary) / "labels.json").read_text()
    shown = sent_images(server.requests[0])  # the first feature's description: its tiles, heatmap over the square
    assert shown and all(image.size[0] >= 96 for image in shown)  # tiles, not the 16-pixel thumbnails
    corner, far = shown[0].getpixel((2, 2)), shown[0].getpixel((shown[0].size[0] - 3, shown[0].size[1] - 3))
    assert corner != far  # where the feature fired (the first token) is painted, the rest keeps the square


def sent_images(request) -> list:
    """The images of a chat request, decoded from their data URLs."""
    import base64
    import io

    from PIL import Image

    urls = [part["image_url"]["url"] for message in request.body["messages"] for part in message["content"]
            if isinstance(part, dict) and part.get("type") == "image_url"]
    return [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB") for url in urls]


def test_vlm_failures_are_statuses_the_run_finishes_and_a_rerun_retries_only_them(comfy, dictionary, monkeypatch,
                                                                                  caplog):
    monkeypatch.setenv(KEY_ENV, KEY)  # the widget left empty: the key comes from the environment
    caplog.set_level(logging.INFO)
    with FakeOpenAIServer() as server:
        server.queue("refuse", "server_error")  # feature 0's description refused; feature 1's a 500 echoing the key
        first = run_node(comfy, vlm_graph(dictionary, server))
        labels = labels_json(comfy, dictionary)
        first_requests = len(server.requests)
        second = run_node(comfy, vlm_graph(dictionary, server))
        retried = server.requests[first_requests:]
        third = run_node(comfy, vlm_graph(dictionary, server))
        third_requests = len(server.requests) - first_requests - len(retried)
    assert labels["0"]["vlm"]["status"] == "refused" and labels["1"]["vlm"]["status"] == "error"
    assert [labels[f]["vlm"]["status"] for f in ("2", "3")] == ["ok", "ok"]
    assert "2 ok, 2 failed, of 4 features" in first and "failed: error 1, refused 1" in first
    assert first_requests == 1 + 1 + 2 * 2  # the failed descriptions were not judged
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert len(retried) == 4  # describe + judge for features 0 and 1 only
    assert "4 ok, 0 failed" in second and "this run labelled 2; 2 already had an ok vlm label" in second
    assert third_requests == 0 and "this run labelled 0" in third
    assert {label["vlm"]["text"] for label in labels_json(comfy, dictionary).values()} == \
        {f"A {colour} square" for colour in FEATURE_COLOURS}
    assert "[key]" in caplog.text  # the 500's echo was logged masked
    for written in (first, second, third, caplog.text,
                    (index_folder_for(comfy.sae_dir / dictionary) / "labels.json").read_text()):
        assert KEY not in written


def test_a_reply_that_holds_the_key_is_dropped_not_stored(comfy, dictionary, monkeypatch):
    monkeypatch.setattr(fake_openai_server, "_reply_to", lambda body: f"Label: Bearer {KEY}")
    with FakeOpenAIServer() as server:
        summary = run_node(comfy, vlm_graph(dictionary, server, vlm_key=KEY))
    labels = labels_json(comfy, dictionary)
    assert {labels[f]["vlm"]["status"] for f in labels} == {"error"}
    assert "0 ok, 4 failed" in summary
    assert KEY not in summary and KEY[:12] not in json.dumps(labels)


def test_a_cancelled_run_keeps_what_it_labelled_and_a_rerun_labels_only_the_rest(comfy, dictionary, monkeypatch):
    model_management = importlib.import_module("comfy.model_management")
    answer = fake_openai_server._reply_to
    seen = []

    def cancel_on_the_third_request(body):
        seen.append(body)
        if len(seen) == 3:  # feature 1's description: the user cancels the queue meanwhile
            model_management.interrupt_current_processing(True)
        return answer(body)

    monkeypatch.setattr(fake_openai_server, "_reply_to", cancel_on_the_third_request)
    with FakeOpenAIServer() as server:
        with pytest.raises(comfy.GraphError):
            run_node(comfy, vlm_graph(dictionary, server))
        statuses = {f: entry["vlm"]["status"] for f, entry in labels_json(comfy, dictionary).items()}
        cancelled_after = len(server.requests)
        summary = run_node(comfy, vlm_graph(dictionary, server))
    assert statuses == {"0": "ok", "1": "ok", "2": "pending", "3": "pending"}
    assert cancelled_after == 4 and len(server.requests) - cancelled_after == 4
    assert "4 ok, 0 failed" in summary and "this run labelled 2; 2 already had an ok vlm label" in summary


def test_vlm_without_a_model_name_is_refused_in_one_line(comfy, dictionary):
    with pytest.raises(comfy.GraphError) as raised:
        run_node(comfy, label_graph(dictionary, "vlm"))
    failure = raised.value.details
    assert failure["exception_type"].endswith("InputError")
    assert "VLM model name is empty" in failure["exception_message"]


# ----------------------------------------------------------------------------- CLIP


def test_clip_labels_each_feature_with_the_vocabulary_word_nearest_its_images(comfy, dictionary):
    summary = run_node(comfy, label_graph(dictionary, "clip", clip_projection=TEXT_WIDTH,
                                          vocabulary="\n".join(VOCABULARY)))
    labels = labels_json(comfy, dictionary)
    vision, text = CLIP_CACHE[f"vision{TEXT_WIDTH}"], CLIP_CACHE["text"]
    index = open_index(index_folder_for(comfy.sae_dir / dictionary))
    with torch.inference_mode():  # as ComfyUI runs nodes
        words = torch.cat([text.encode_from_tokens(text.tokenize(f"a photo of {word}"), return_pooled=True)[1]
                           for word in VOCABULARY])
        embeds = [torch.cat([vision.encode_image(load(index.image_path(feature, rank)))["image_embeds"]
                             for rank in range(count)]) for feature, count in enumerate(IMAGES_PER_FEATURE)]
    for feature in range(len(IMAGES_PER_FEATURE)):
        expected = clip_label(embeds[feature], words, VOCABULARY, feature=feature)
        entry = labels[str(feature)]["clip"]
        assert entry["status"] == "ok" and entry["text"] == expected.text
        assert entry["score"] == pytest.approx(expected.score, abs=1e-4)
    assert "clip labels of" in summary and "4 ok, 0 failed, of 4 features" in summary


def test_clip_vocabulary_is_words_by_line_or_comma_each_once_and_empty_means_the_default(comfy):
    words = importlib.import_module(comfy.label_node.__module__).vocabulary_words
    assert words("red, green\n blue  sky \n\nRed,") == ["red", "green", "blue sky"]
    assert words("") == words(" \n, ") == list(DEFAULT_VOCABULARY)


def test_clip_vision_and_text_of_different_widths_are_refused(comfy, dictionary):
    with pytest.raises(comfy.GraphError) as raised:
        run_node(comfy, label_graph(dictionary, "clip", clip_projection=TEXT_WIDTH - 4, vocabulary="red"))
    message = raised.value.details["exception_message"]
    assert f"{TEXT_WIDTH - 4}-wide" in message and f"{TEXT_WIDTH}-wide" in message and "same CLIP model" in message
    assert not (index_folder_for(comfy.sae_dir / dictionary) / "labels.json").exists()


def test_clip_without_its_encoders_is_refused(comfy, dictionary):
    with pytest.raises(comfy.GraphError) as raised:
        run_node(comfy, label_graph(dictionary, "clip"))
    assert "needs clip_vision" in raised.value.details["exception_message"]


def load(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


# ----------------------------------------------------------------------------- refusals


def test_a_dictionary_without_an_index_is_refused_with_what_to_run(comfy):
    path = comfy.sae_dir / "unindexed.safetensors"
    save_dictionary(SparseAutoencoder(8, N_LATENTS, 1, seed=0), path)
    with pytest.raises(comfy.GraphError) as raised:
        run_node(comfy, label_graph("unindexed.safetensors"))
    failure = raised.value.details
    assert failure["exception_type"].endswith("InputError")
    assert "has no feature index yet" in failure["exception_message"]
    assert "run Build Feature Index" in failure["exception_message"]
    assert str(comfy.sae_dir) not in failure["exception_message"]
    assert "\n" not in failure["exception_message"].strip()


def test_a_damaged_labels_file_is_refused_naming_it_from_models_sae(comfy, dictionary):
    (index_folder_for(comfy.sae_dir / dictionary) / "labels.json").write_text("{not json")
    with pytest.raises(comfy.GraphError) as raised:
        run_node(comfy, label_graph(dictionary))
    message = raised.value.details["exception_message"]
    assert f"models/sae/{Path(dictionary).stem}.features/labels.json is damaged" in message
    assert str(comfy.sae_dir) not in message


def test_an_index_where_no_feature_fired_says_there_is_nothing_to_label(comfy):
    path = comfy.sae_dir / "silent.safetensors"
    sae = SparseAutoencoder(8, N_LATENTS, 1, seed=0)
    save_dictionary(sae, path)
    builder = FeatureIndexBuilder(index_folder_for(path), DictionaryIdentity.of(sae, path), top_m=2)
    silent = SparseCodes(torch.zeros(GRID[0] * GRID[1], 1), torch.zeros(GRID[0] * GRID[1], 1, dtype=torch.long))
    builder.add(np.zeros((16, 16, 3), dtype=np.uint8), "a black square", silent, GRID, progress=0.5)
    builder.finish()
    summary = run_node(comfy, label_graph("silent.safetensors"))
    assert summary == ("no feature of silent.safetensors's index ever fired: nothing to label "
                       "(models/sae/silent.features)")
