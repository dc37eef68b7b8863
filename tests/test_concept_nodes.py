"""Steer by Concept and Steer Sweep (nodes/concept_nodes.py) in graphs run by ComfyUI's executor, on the committed
Flux organism with its shipped dictionary and the feature index beside it (models/sae/organism_flux_db1_image.*).

A steered MODEL must change sampling and leave the model it was cloned from as it was; a concept from a word must
come from the index alone; the sweep's zero-strength column must be the unsteered sample bit for bit, and its
grid must hold every cell's picture exactly where the layout says.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.concepts import concept_from_words
from sae_core.feature_index import open_index

REPO = Path(__file__).resolve().parents[1]
DICTIONARY = "organism_flux_db1_image.safetensors"
INDEX = REPO / "models" / "sae" / "organism_flux_db1_image.features"
STEPS = 4
TOP_N = 4
KEPT: dict = {}  # label -> what a test-only node kept


class SAETestSampleSteeredThenOriginal:
    """Test-only output node: samples the steered MODEL, then the original one (KSampler's own way), so that the
    original is sampled after everything the steered clone did; keeps both latents."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steered": ("MODEL",), "original": ("MODEL",), "positive": ("CONDITIONING",),
                             "negative": ("CONDITIONING",), "latent": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "sample"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def sample(self, steered, original, positive, negative, latent):
        import nodes

        for label, model in (("steered", steered), ("original", original)):
            KEPT[label] = nodes.common_ksampler(model, 5, STEPS, 4.0, "euler", "simple", positive, negative,
                                               latent)[0]["samples"].clone()
        return {}


@pytest.fixture(scope="module")
def comfy(comfyui, one_thread):
    comfyui.load_plugin_nodes()
    import nodes

    nodes.NODE_CLASS_MAPPINGS["SAETestConceptKeep"] = comfyui.image_keeper(KEPT)
    nodes.NODE_CLASS_MAPPINGS["SAETestSampleSteeredThenOriginal"] = SAETestSampleSteeredThenOriginal
    return comfyui


@pytest.fixture(scope="module")
def concept_nodes(comfy):
    return importlib.import_module(f"{comfy.plugin_module().__name__}.nodes.concept_nodes")


@pytest.fixture(scope="module")
def index():
    return open_index(INDEX)


def organism(prompt: str = "a handwritten one") -> dict:
    """The committed Flux organism, a prompt and the empty prompt, one empty latent."""
    return {
        "1": {"class_type": "SAELoadModelOrganism", "inputs": {"family": "flux", "folder": ""}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "SAEEmptyOrganismLatent", "inputs": {"batch_size": 1}},
    }


def concept_node(**inputs) -> dict:
    return {"class_type": "SAESteerByConcept", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "dictionary": DICTIONARY, "site": "", "source": "prompts",
        "positive": "a handwritten seven\nthe digit seven", "negative": "a handwritten one\nthe digit one",
        "top_n": TOP_N, "strength": 1.0, "mode": "add", "window_start": 0.0, "window_end": 1.0, "cond_only": True,
        "latent": ["4", 0], "seed": 0, "steps": STEPS, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
        **inputs}}


def sweep_node(**inputs) -> dict:
    return {"class_type": "SAESteerSweep", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent": ["4", 0], "vae": ["1", 2],
        "seed": 3, "steps": STEPS, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
        "site": "double_blocks.1:image", "features": "761, 318", "mode": "add", "units": "token_norm",
        "strengths": "0, 0.5", "windows": "0-1, 0.5-1", "cond_only": True, **inputs}}


def unsteered_sample(seed: int, label: str) -> dict:
    """Nodes 5-7 of an organism graph: KSampler on the unsteered model, decoded, kept under ``label``."""
    return {"5": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
                "steps": STEPS, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": keep(["6", 0], label)}


def keep(images: list, label: str) -> dict:
    return {"class_type": "SAETestConceptKeep", "inputs": {"images": images, "label": label}}


def feature_lines(text: str) -> list[tuple[int, float, str]]:
    """``(id, weight, label)`` of each ``  #id weight  label`` line of the node's text ("" without a label)."""
    return [(int(m[1]), float(m[2]), m[3] or "")
            for m in re.finditer(r"^  #(\d+) (\S+)(?:  (.*))?$", text, re.MULTILINE)]


def test_steer_by_concept_from_prompts_steers_a_clone_and_labels_its_features(comfy, index):
    plain = {**organism(), **unsteered_sample(seed=5, label="plain")}
    comfy.execute_graph(plain)
    graph = organism()
    graph["10"] = concept_node()
    graph["11"] = {"class_type": "SAETestSampleSteeredThenOriginal", "inputs": {
        "steered": ["10", 0], "original": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent": ["4", 0]}}
    outputs = comfy.execute_graph(graph)["outputs"]

    vae_decode = comfy.plugin_module().nodes.organism_nodes.OrganismVAE().decode
    assert torch.equal(vae_decode(KEPT["original"]), KEPT["plain"])  # the original model is untouched
    assert not torch.equal(KEPT["steered"], KEPT["original"])
    text = outputs["10"]["text"][0]
    assert text.startswith(f"{DICTIONARY} at double_blocks.1:image: add, strength 1")
    lines = feature_lines(text)
    assert len(lines) == TOP_N
    assert [abs(w) for _, w, _ in lines] == sorted((abs(w) for _, w, _ in lines), reverse=True)
    assert all(label == index.label(f) for f, _, label in lines)  # every shipped feature here has a label
    assert len(outputs["10"]["images"]) == 1


def test_steer_by_concept_from_a_word_reads_the_index_without_sampling(comfy, index, concept_nodes, monkeypatch):
    import comfy.sample as comfy_sample

    def no_sampling(*args, **kwargs):
        raise AssertionError("a concept from a word must not sample")

    monkeypatch.setattr(comfy_sample, "sample", no_sampling)
    graph = organism()
    graph["10"] = concept_node(source="words", positive="seven", negative="")
    graph["11"] = keep(["10", 3], "pictures")
    outputs = comfy.execute_graph(graph)["outputs"]

    expected = concept_from_words(index, "seven", TOP_N)
    lines = feature_lines(outputs["10"]["text"][0])
    assert [f for f, _, _ in lines] == list(expected.features)
    assert [w for _, w, _ in lines] == pytest.approx(expected.weights, rel=1e-3)
    assert all(label == index.label(f) for f, _, label in lines)
    tile = index.tile(expected.features[0], 0)
    labels = [f"#{f} {w:+.3g}" for f, w in zip(expected.features, expected.weights)]
    layout = concept_nodes.grid_layout(1, TOP_N, (tile.height, tile.width), [""], labels)
    pictures = KEPT["pictures"]
    assert pictures.shape == (1, *layout.size, 3)
    y, x = layout.corner(0, 0)
    first = torch.from_numpy(np.array(tile.convert("RGB"))).float() / 255
    assert torch.equal(pictures[0, y:y + tile.height, x:x + tile.width], first)


def test_without_a_feature_index_the_features_are_listed_unlabelled_and_words_are_refused(comfy, tmp_path):
    import shutil

    import folder_paths

    shutil.copy(INDEX.with_suffix(".safetensors"), tmp_path / "unindexed.safetensors")
    folder_paths.add_model_folder_path("sae", str(tmp_path))
    graph = organism()
    graph["10"] = concept_node(dictionary="unindexed.safetensors", positive="a handwritten seven",
                               negative="a handwritten one")
    text = comfy.execute_graph(graph)["outputs"]["10"]["text"][0]
    assert "no feature index" in text
    lines = feature_lines(text)
    assert len(lines) == TOP_N and all(label == "" for _, _, label in lines)

    graph["10"] = concept_node(dictionary="unindexed.safetensors", source="words", positive="seven")
    with pytest.raises(comfy.GraphError) as refused:
        comfy.execute_graph(graph)
    assert refused.value.details["exception_message"].strip() == (
        "source words reads the feature index beside unindexed.safetensors, which has none: build one with Build "
        "Feature Index, or set source to prompts")


@pytest.mark.parametrize("positive, message", [
    ("submarine", "no feature of this index is associated with the word 'submarine'; words it knows include"),
    ("a seven", "positive 'a seven': source words takes one word the feature index knows"),
])
def test_a_word_the_index_does_not_know_is_one_clear_line(comfy, positive, message):
    graph = organism()
    graph["10"] = concept_node(source="words", positive=positive, negative="")
    with pytest.raises(comfy.GraphError) as refused:
        comfy.execute_graph(graph)
    assert message in refused.value.details["exception_message"]
    assert "\n" not in refused.value.details["exception_message"].strip()


def test_steer_sweep_grid_holds_every_cell_and_zero_strength_is_the_unsteered_sample(comfy, concept_nodes):
    graph = organism()
    graph.update(unsteered_sample(seed=3, label="unsteered"))
    graph["8"] = {"class_type": "SAELoadDictionary", "inputs": {"dictionary": DICTIONARY, "hub_id": ""}}
    graph["9"] = sweep_node(dictionary=["8", 0])
    graph["10"] = keep(["9", 0], "grid")
    graph["11"] = keep(["9", 1], "cells")
    graph["12"] = concept_node(source="words", positive="seven", negative="")
    graph["13"] = sweep_node(concept=["12", 1], strengths="0, 2", windows="0-1", features="")
    graph["14"] = keep(["13", 1], "concept cells")
    comfy.execute_graph(graph)

    unsteered, cells = KEPT["unsteered"], KEPT["cells"]
    assert cells.shape == (4, 32, 32, 3)  # rows (windows) x columns (strengths), row by row
    assert torch.equal(cells[0], unsteered[0]) and torch.equal(cells[2], unsteered[0])
    assert not torch.equal(cells[1], unsteered[0])
    assert not torch.equal(cells[3], cells[1])  # steering only late in sampling is another picture
    layout = concept_nodes.grid_layout(2, 2, (32, 32), ["0-1", "0.5-1"], ["0", "0.5"],
                                       title="strength across, window down")
    grid = KEPT["grid"]
    assert grid.shape == (1, *layout.size, 3)
    for i in range(4):
        y, x = layout.corner(*divmod(i, 2))
        enlarged = cells[i].repeat_interleave(layout.scale, 0).repeat_interleave(layout.scale, 1)
        assert torch.equal(grid[0, y:y + layout.cell_height, x:x + layout.cell_width], enlarged)
    concept_cells = KEPT["concept cells"]
    assert torch.equal(concept_cells[0], unsteered[0]) and not torch.equal(concept_cells[1], unsteered[0])


@pytest.mark.parametrize("inputs, message", [
    ({"strengths": "0, nan"}, "strength 'nan' is not a finite number"),
    ({"strengths": "0, strong"}, "strength 'strong' is not a number"),
    ({"strengths": ", "}, "strengths is empty"),
    ({"windows": "0.5-0.2"}, "window '0.5-0.2' starts after it ends"),
    ({"windows": "0-2"}, "window '0-2' ends after 1"),
    ({"windows": "0.3"}, "window '0.3' is not start-end"),
    ({"strengths": ", ".join(["0.1"] * 33)}, "33 strengths x 2 windows make 66 cells, more than 64"),
    ({"mode": "ablate", "strengths": "0, 2"}, "ablate strength 2: it is the fraction"),
])
def test_steer_sweep_refuses_bad_strengths_and_windows_before_sampling(comfy, monkeypatch, inputs, message):
    import comfy.sample as comfy_sample

    def no_sampling(*args, **kwargs):
        raise AssertionError("a refused sweep must not sample")

    monkeypatch.setattr(comfy_sample, "sample", no_sampling)
    graph = organism()
    graph["8"] = {"class_type": "SAELoadDictionary", "inputs": {"dictionary": DICTIONARY, "hub_id": ""}}
    graph["9"] = sweep_node(dictionary=["8", 0], **inputs)
    with pytest.raises(comfy.GraphError) as refused:
        comfy.execute_graph(graph)
    assert message in refused.value.details["exception_message"]
    assert "\n" not in refused.value.details["exception_message"].strip()


def test_a_clamp_concept_is_measured_per_step_and_position_and_steers_a_clone_and_the_sweep(comfy):
    graph = organism()
    graph.update(unsteered_sample(seed=3, label="unsteered"))
    graph["10"] = concept_node(mode="clamp")
    graph["11"] = {"class_type": "SAETestSampleSteeredThenOriginal", "inputs": {
        "steered": ["10", 0], "original": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent": ["4", 0]}}
    graph["12"] = sweep_node(concept=["10", 1], strengths="0, 1", windows="0-1", features="")
    graph["13"] = keep(["12", 1], "clamp cells")
    outputs = comfy.execute_graph(graph)["outputs"]

    text = outputs["10"]["text"][0]
    assert text.startswith(f"{DICTIONARY} at double_blocks.1:image: clamp, strength 1")
    assert f"clamps, at each of {STEPS} steps x 64 positions, its {TOP_N} features" in text
    assert len(feature_lines(text)) == TOP_N
    assert not torch.equal(KEPT["steered"], KEPT["original"])
    cells = KEPT["clamp cells"]
    assert torch.equal(cells[0], KEPT["unsteered"][0]) and not torch.equal(cells[1], KEPT["unsteered"][0])


@pytest.mark.parametrize("concept, sweep, message", [
    ({"mode": "clamp", "source": "words", "positive": "seven", "negative": ""}, None,
     "clamp mode measures the positive and negative prompts at every step and position: set source to prompts"),
    ({"mode": "clamp", "strength": 2.0}, None, "clamp strength 2: it is the fraction 0..1"),
    ({"mode": "clamp"}, {"strengths": "0, 2"}, "a clamp concept's strengths are fractions 0..1"),
])
def test_clamp_settings_that_only_break_pictures_are_refused_in_one_line(comfy, concept, sweep, message):
    graph = organism()
    graph["10"] = concept_node(**concept)
    if sweep is not None:
        graph["12"] = sweep_node(concept=["10", 1], windows="0-1", features="", **sweep)
    with pytest.raises(comfy.GraphError) as refused:
        comfy.execute_graph(graph)
    assert message in refused.value.details["exception_message"]
    assert "\n" not in refused.value.details["exception_message"].strip()
