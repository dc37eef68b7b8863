"""Our nodes in real ComfyUI graphs, run in-process with ComfyUI's own validator and executor.

A tiny Flux model enters graphs through test-only nodes (defined here, also used by the server tests):
``SAETestTinyFlux`` -> MODEL, ``SAETestTinyInputs`` -> positive/negative CONDITIONING + LATENT,
``SAETestKeepLatent`` -> the sampled latent's sha256 in the node's UI output, ``SAETestLatentToImage``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tiny_comfy_models import model_node, tiny_flux_patcher

REPO = Path(__file__).resolve().parents[1]
SITE = "double_blocks.0:image"
LATENT_SIZE = 8  # 8x8 latent -> 4x4 = 16 image tokens (patch size 2)
STEPS = 3


# ----------------------------------------------------------------------------- test-only nodes


SAETestTinyFlux = model_node("SAETestTinyFlux", tiny_flux_patcher)


class SAETestTinyInputs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000}),
                             "batch": ("INT", {"default": 1, "min": 1, "max": 8})},
                "optional": {"run": ("INT", {"default": 0, "min": 0, "max": 1 << 30,
                                             "tooltip": "ignored; a new value makes ComfyUI sample again"})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    def make(self, seed, batch, run=0):
        import torch

        g = torch.Generator().manual_seed(seed)

        def cond():
            return [[torch.randn(1, 8, 48, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]

        # Non-zero, so KSampler keeps its 4 channels (an all-zero latent is widened to Flux's 16).
        latent = torch.randn(batch, 4, LATENT_SIZE, LATENT_SIZE, generator=g) * 0.1
        return (cond(), cond(), {"samples": latent})


class SAETestKeepLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def keep(self, samples):
        x = samples["samples"].contiguous()
        return {"ui": {"sha256": [hashlib.sha256(x.numpy().tobytes()).hexdigest()], "shape": list(x.shape)}}


class SAETestLatentToImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "convert"
    CATEGORY = "_for_testing"

    def convert(self, samples):
        import torch.nn.functional as F

        x = samples["samples"][:, :3].float()
        x = F.interpolate(x, scale_factor=8, mode="nearest")
        return (((x - x.min()) / (x.max() - x.min() + 1e-8)).movedim(1, -1),)


TEST_NODES = {cls.__name__: cls for cls in (SAETestTinyFlux, SAETestTinyInputs, SAETestKeepLatent, SAETestLatentToImage)}


# ----------------------------------------------------------------------------- graphs


def sampling_graph(model_link=("1", 0), cfg=2.0, seed=0, batch=1, run=0) -> dict:
    """Tiny Flux (node 1) + inputs (node 2) -> KSampler (node 3) -> kept latent (node 4); add nodes >= 10."""
    return {
        "1": {"class_type": "SAETestTinyFlux", "inputs": {"seed": 0}},
        "2": {"class_type": "SAETestTinyInputs", "inputs": {"seed": 1, "batch": batch, "run": run}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": list(model_link), "seed": seed, "steps": STEPS, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["2", 2], "denoise": 1.0}},
        "4": {"class_type": "SAETestKeepLatent", "inputs": {"samples": ["3", 0]}},
    }


def steer_nodes(dictionary: str, strength: float, features="0", site=SITE, mode="add", model_link=("1", 0)) -> dict:
    return {
        "10": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": dictionary, "hub_id": ""}},
        "11": {"class_type": "SAESteer", "inputs": {
            "model": list(model_link), "dictionary": ["10", 0], "site": site, "mode": mode, "features": features,
            "strength": strength, "units": "token_norm", "window_start": 0.0, "window_end": 1.0, "cond_only": True}},
    }


def steered_graph(dictionary: str, strength: float, run=0, **kw) -> dict:
    graph = sampling_graph(model_link=("11", 0), run=run)
    graph.update(steer_nodes(dictionary, strength, **kw))
    return graph


def latent_sha(history: dict) -> str:
    return history["outputs"]["4"]["sha256"][0]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def comfy(comfyui, tmp_path_factory):
    """ComfyUI with our plugin and the test nodes loaded, ``models/sae`` pointed at a temp folder."""
    comfyui.load_plugin_nodes()
    import folder_paths
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
    sae_dir = tmp_path_factory.mktemp("models_sae")
    folder_paths.add_model_folder_path("sae", str(sae_dir), is_default=True)
    comfyui.sae_dir = sae_dir
    return comfyui


def _sae_core(comfy):
    import sys

    return sys.modules[comfy.plugin_module().__name__ + ".sae_core"]


@pytest.fixture(scope="module")
def captured(comfy):
    """Capture (cfg 2, cond rows only, half the tokens) and train a TopK dictionary in one graph."""
    graph = sampling_graph(model_link=("10", 0))
    graph.update({
        "10": {"class_type": "SAECaptureActivations", "inputs": {
            "model": ["1", 0], "site": SITE, "window_start": 0.0, "window_end": 1.0, "token_fraction": 0.5,
            "cond_only": True, "folder": "sae_activations/graph_test", "dtype": "float32"}},
        "11": {"class_type": "SAETrainDictionary", "inputs": {
            "capture": ["10", 1], "after": ["3", 0], "kind": "topk", "k": 4, "expansion": 2, "steps": 20,
            "lr": 0.001, "batch_size": 16, "name": "tiny_db0"}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 1]}},
    })
    import folder_paths

    history = comfy.execute_graph(graph)
    return history, Path(folder_paths.get_output_directory()) / "sae_activations" / "graph_test"


# ----------------------------------------------------------------------------- capture and train


def test_capture_graph_writes_shards_with_the_expected_count(comfy, captured):
    _, folder = captured
    reader = _sae_core(comfy).ShardReader(folder, batch_size=1, shuffle=False)
    tokens = (LATENT_SIZE // 2) ** 2
    assert reader.n_tokens == STEPS * 1 * (tokens // 2)  # steps x cond rows x half the tokens
    assert reader.d == 64
    assert reader.site.block == "double_blocks.0" and reader.site.stream == "image"


def test_train_node_saves_a_dictionary_in_models_sae_and_previews_its_loss(comfy, captured):
    history, _ = captured
    path = comfy.sae_dir / "tiny_db0.safetensors"
    header = _sae_core(comfy).read_header(path)
    text = json.dumps(header)
    assert '"topk"' in text and "64" in text
    assert history["outputs"]["12"]["images"]  # the loss curve went through PreviewImage


def memory_capture_graph(max_vectors: int, kind: str = "itda", run: int = 0) -> dict:
    graph = sampling_graph(model_link=("10", 0), run=run)
    graph.update({
        "10": {"class_type": "SAECaptureActivations", "inputs": {
            "model": ["1", 0], "site": SITE, "window_start": 0.0, "window_end": 1.0, "token_fraction": 1.0,
            "cond_only": True, "folder": "", "dtype": "float32", "destination": "memory", "max_vectors": max_vectors}},
        "11": {"class_type": "SAETrainDictionary", "inputs": {
            "capture": ["10", 1], "after": ["3", 0], "kind": kind, "k": 4, "expansion": 2, "steps": 3,
            "lr": 0.001, "batch_size": 16, "name": f"tiny_memory_{kind}"}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 1]}},
    })
    return graph


def test_memory_capture_trains_an_itda_dictionary_without_writing_shards(comfy):
    import folder_paths

    before = sorted(Path(folder_paths.get_output_directory()).rglob("*.safetensors"))
    comfy.execute_graph(memory_capture_graph(max_vectors=10_000))
    header = _sae_core(comfy).read_header(comfy.sae_dir / "tiny_memory_itda.safetensors")
    assert header["kind"] == "itda" and header["n_latents"] > 0
    assert sorted(Path(folder_paths.get_output_directory()).rglob("*.safetensors")) == before


def test_a_full_memory_capture_is_a_clear_error(comfy):
    message = _node_error(comfy, memory_capture_graph(max_vectors=10, run=1))
    assert "capture buffer is full at" in message


def test_load_dictionary_describes_the_file(comfy, captured):
    import nodes

    sae, description = nodes.NODE_CLASS_MAPPINGS["SAELoadDictionary"]().load("tiny_db0.safetensors")
    assert sae.d_in == 64 and sae.n_latents == 128
    assert "topk" in description and "d_in=64" in description and "n_latents=128" in description


# ----------------------------------------------------------------------------- steer


def test_zero_strength_steer_is_bit_identical_and_nonzero_changes_the_latent(comfy, captured):
    plain = latent_sha(comfy.execute_graph(sampling_graph()))
    zero = latent_sha(comfy.execute_graph(steered_graph("tiny_db0.safetensors", 0.0)))
    strong = latent_sha(comfy.execute_graph(steered_graph("tiny_db0.safetensors", 2.0)))
    assert zero == plain
    assert strong != plain


def test_steer_nodes_chain(comfy, captured):
    graph = steered_graph("tiny_db0.safetensors", 1.0, features="1")
    graph["3"]["inputs"]["model"] = ["12", 0]
    graph["12"] = {"class_type": "SAESteer", "inputs": {
        **graph["11"]["inputs"], "model": ["11", 0], "features": "2", "mode": "ablate"}}
    single = latent_sha(comfy.execute_graph(steered_graph("tiny_db0.safetensors", 1.0, features="1")))
    chained = latent_sha(comfy.execute_graph(graph))
    assert chained != single


def test_a_sigma_range_outside_the_schedule_leaves_sampling_untouched(comfy, captured):
    plain = latent_sha(comfy.execute_graph(sampling_graph(run=7)))
    graph = steered_graph("tiny_db0.safetensors", 1.0, run=8)
    graph["11"]["inputs"].update(sigma_min=50.0, sigma_max=60.0)  # the schedule's sigmas are all <= 1
    assert latent_sha(comfy.execute_graph(graph)) == plain
    graph = steered_graph("tiny_db0.safetensors", 1.0, run=9)
    graph["11"]["inputs"].update(sigma_min=0.0, sigma_max=1.0)
    assert latent_sha(comfy.execute_graph(graph)) != plain


def test_subtracting_from_the_uncond_half_is_a_different_steer(comfy, captured):
    cond_only = latent_sha(comfy.execute_graph(steered_graph("tiny_db0.safetensors", 1.0, run=10)))
    graph = steered_graph("tiny_db0.safetensors", 1.0, run=11)
    graph["11"]["inputs"]["subtract_uncond"] = True
    assert latent_sha(comfy.execute_graph(graph)) != cond_only


def test_train_node_reports_how_many_vectors_it_trained_on(comfy, captured):
    history, _ = captured
    summary = history["outputs"]["11"]["text"][0]
    assert "trained on 24 captured vectors" in summary and "tiny_db0.safetensors" in summary


@pytest.fixture(scope="module")
def narrow_dictionary(comfy):
    """A dictionary of width 32, wrong for the tiny Flux (64)."""
    import torch

    core = _sae_core(comfy)
    acts = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    config = core.TrainConfig(kind="topk", k=4, n_latents=64, total_steps=5, batch_size=128, warmup_steps=1)
    core.save_dictionary(core.train_dictionary(acts, config).dictionary, comfy.sae_dir / "narrow.safetensors")
    return "narrow.safetensors"


def _node_error(comfy, graph) -> str:
    with pytest.raises(comfy.GraphError) as raised:
        comfy.execute_graph(graph)
    return json.dumps(raised.value.details) + str(raised.value)


def test_dictionary_width_not_matching_the_site_is_a_node_error(comfy, narrow_dictionary):
    message = _node_error(comfy, steered_graph(narrow_dictionary, 1.0))
    assert "SAESteer" in message and "d_in=32" in message and "width 64" in message


def test_feature_id_out_of_range_is_a_node_error(comfy, captured):
    message = _node_error(comfy, steered_graph("tiny_db0.safetensors", 1.0, features="0, 999"))
    assert "feature 999 is out of range" in message


def test_unknown_site_is_a_node_error_listing_the_sites(comfy, captured):
    message = _node_error(comfy, steered_graph("tiny_db0.safetensors", 1.0, site="double_blocks.7:image"))
    assert "unknown site 'double_blocks.7:image'" in message and SITE in message


def test_empty_mask_is_a_node_error(comfy, captured):
    graph = steered_graph("tiny_db0.safetensors", 1.0)
    graph["12"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    graph["11"]["inputs"]["mask"] = ["12", 0]
    assert "mask is empty" in _node_error(comfy, graph)


def test_masked_steer_changes_only_what_the_mask_allows(comfy, captured):
    graph = steered_graph("tiny_db0.safetensors", 2.0)
    graph["12"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    graph["11"]["inputs"]["mask"] = ["12", 0]
    full_mask = latent_sha(comfy.execute_graph(graph))
    assert full_mask == latent_sha(comfy.execute_graph(steered_graph("tiny_db0.safetensors", 2.0)))


# ----------------------------------------------------------------------------- inspect


def test_record_features_feeds_heatmap_and_top_features(comfy, captured):
    graph = sampling_graph(model_link=("11", 0))
    graph.update({
        "10": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": "tiny_db0.safetensors", "hub_id": ""}},
        "11": {"class_type": "SAERecordFeatures", "inputs": {
            "model": ["1", 0], "dictionary": ["10", 0], "site": SITE, "window_start": 1.0, "window_end": 1.0}},
        "12": {"class_type": "SAETestLatentToImage", "inputs": {"samples": ["3", 0]}},
        "13": {"class_type": "SAEFeatureHeatmap", "inputs": {"image": ["12", 0], "recording": ["11", 1],
                                                            "feature": 0, "opacity": 0.6}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
        "15": {"class_type": "SAETopFeatures", "inputs": {"image": ["12", 0], "recording": ["11", 1], "n": 5}},
        "16": {"class_type": "PreviewAny", "inputs": {"source": ["15", 0]}},
        "17": {"class_type": "PreviewImage", "inputs": {"images": ["15", 1]}},
    })
    outputs = comfy.execute_graph(graph)["outputs"]
    text = outputs["16"]["text"][0]
    assert len(text.splitlines()) == 5 and "fires on" in text
    assert outputs["14"]["images"] and outputs["17"]["images"]
    assert latent_sha({"outputs": outputs}) == latent_sha(comfy.execute_graph(sampling_graph()))  # recording only reads


# ----------------------------------------------------------------------------- example workflows


FILE_INPUTS = {"unet_name", "clip_name1", "clip_name2", "vae_name", "dictionary"}


@pytest.mark.parametrize("path", sorted((REPO / "example_workflows").glob("*.api.json")), ids=lambda p: p.name)
def test_example_workflow_validates_apart_from_missing_model_files(comfy, path):
    """ComfyUI's validator accepts each example; the only errors allowed are model files this machine lacks."""
    import asyncio

    import execution

    prompt = json.loads(path.read_text())
    valid, error, _, node_errors = asyncio.run(execution.validate_prompt("example", prompt, None))
    problems = [
        (node, e) for node, entry in node_errors.items() for e in entry["errors"]
        if not (e["type"] == "value_not_in_list" and e["extra_info"]["input_name"] in FILE_INPUTS)
    ]
    assert not problems, problems
    assert valid or error["type"] == "prompt_outputs_failed_validation"
    assert any(n["class_type"].startswith("SAE") for n in prompt.values())
