"""Diff-C Probe (nodes/probe_nodes.py) in graphs run by ComfyUI's executor, on the committed Flux organism.

The labelled folder is what a user without images of their own makes: the organism's held-out images
(``organism.data.organism_data()``, never trained on), written as PNGs into ComfyUI's input folder, one subfolder
per class. Four classes of six images are too few to expect a clear accuracy, so the table is checked for its
shape, its sites and levels, its image counts and values in [0, 1], not for a score.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from organism.data import CLASSES, organism_data

FOLDER = "probe_organism"
CLASS_IDS = (0, 1, 10, 11)  # two digits, two animals
PER_CLASS = 6
SITES = ("double_blocks.0:image", "single_blocks.1:image")
KEPT: dict = {}


class SAETestProbeKeep:
    """Test-only output node: keeps the probe's heatmap and table."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"heatmap": ("IMAGE",), "table": ("STRING", {"forceInput": True})}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def keep(self, heatmap, table):
        KEPT.update(heatmap=heatmap.clone(), table=table)
        return {"ui": {}}


def write_class_folder(root: Path, images: dict[str, list[np.ndarray]]) -> None:
    """``root/<class>/<i>.png`` for each class's uint8 gray images."""
    for name, pictures in images.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(pictures):
            Image.fromarray(picture, mode="L").save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def comfy(comfyui, one_thread, tmp_path_factory):
    """ComfyUI with the plugin, and in its input folder: the organism's held-out images (FOLDER), and folders
    that are wrong in one way each."""
    comfyui.load_plugin_nodes()
    import folder_paths
    import nodes

    nodes.NODE_CLASS_MAPPINGS["SAETestProbeKeep"] = SAETestProbeKeep
    _, held_out = organism_data()
    pixels = ((held_out.images[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    chosen = {CLASSES[c]: [pixels[i] for i in np.flatnonzero(held_out.labels.numpy() == c)[:PER_CLASS]]
              for c in CLASS_IDS}
    inputs = Path(folder_paths.get_input_directory())
    write_class_folder(inputs / FOLDER, chosen)
    two = {name: pictures[:2] for name, pictures in chosen.items()}
    write_class_folder(inputs / "probe_lonely", {**two, "cat": two["zero"][:1]})
    write_class_folder(inputs / "probe_one_class", {"zero": chosen["zero"]})
    write_class_folder(inputs / "probe_broken", two)
    (inputs / "probe_broken" / "one" / "2.png").write_bytes(b"not a png")
    outside = tmp_path_factory.mktemp("outside_input")
    write_class_folder(outside, two)
    (inputs / "probe_link").symlink_to(outside, target_is_directory=True)
    comfyui.outside_input = outside
    return comfyui


def probe_graph(folder: str = FOLDER, sites: str = ", ".join(SITES), levels: str = "0.7, 0.3") -> dict:
    return {
        "1": {"class_type": "SAELoadModelOrganism", "inputs": {"family": "flux", "folder": ""}},
        "2": {"class_type": "SAEDiffCProbe", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "folder": folder, "sites": sites, "levels": levels,
            "test_fraction": 0.5, "seed": 0, "batch_size": 8}},
        "3": {"class_type": "SAETestProbeKeep", "inputs": {"heatmap": ["2", 0], "table": ["2", 1]}},
    }


def refusal(comfy, **graph) -> tuple[str, str]:
    """``(error type, message)`` of the probe graph that fails with one of the project's errors."""
    with pytest.raises(comfy.GraphError) as raised:
        comfy.execute_graph(probe_graph(**graph))
    failure = raised.value.details
    assert failure["node_type"] == "SAEDiffCProbe" and failure["exception_type"].startswith("diffusion_sae.")
    return failure["exception_type"].rsplit(".", 1)[-1], failure["exception_message"].strip()


def table_rows(table: str) -> dict[str, list[float]]:
    """``{site: [accuracy per level]}`` from the markdown table's rows (bold marks the best cell)."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "site":
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def test_the_probe_scores_every_site_at_every_level_in_a_table_and_a_heatmap(comfy):
    import torch

    from sae_core.probe import ProbeTable

    history = comfy.execute_graph(probe_graph())
    table, heatmap = KEPT["table"], KEPT["heatmap"]
    assert history["outputs"]["2"]["text"][0] == table
    assert table.startswith(f"Diff-C probe of input/{FOLDER}: 24 images of 4 classes (bear, bird, one, zero)")
    assert "| site | 0.3 | 0.7 |" in table  # levels sorted
    rows = table_rows(table)
    assert list(rows) == list(SITES)
    accuracy = torch.tensor(list(rows.values()))
    assert accuracy.shape == (2, 2) and bool(((accuracy >= 0) & (accuracy <= 1)).all())
    # 3 of each class's 6 images held out; chance is the test set's most common class: 3 / 12
    assert "Chance 0.250; 12 train / 12 test images." in table
    expected = ProbeTable(list(SITES), [0.3, 0.7], accuracy, 0.25, 12, 12).heatmap(f"Diff-C: input/{FOLDER}")
    assert heatmap.shape == (1, expected.height, expected.width, 3)
    assert heatmap.std() > 0.05  # a chart, not a blank
    assert len(history["outputs"]["2"]["images"]) == 1  # shown on the node


@pytest.mark.parametrize("folder", ["../x", "/etc", "~/x", "probe_link", "a/../../x", "", ".", "x\x00y", "a" * 300,
                                    "a/" * 2000],
                         ids=["dotdot", "absolute", "home", "symlink_out", "dotdot_inside", "empty", "input_itself",
                              "control_char", "long_name", "long_path"])
def test_a_folder_that_is_not_one_inside_the_input_folder_is_refused_in_one_line(comfy, folder):
    kind, message = refusal(comfy, folder=folder)
    assert kind == "InputError" and "\n" not in message
    assert "ComfyUI's input folder" in message


def test_an_absolute_path_to_a_real_class_folder_is_refused_without_naming_server_paths(comfy):
    kind, message = refusal(comfy, folder=str(comfy.outside_input))
    assert kind == "InputError" and "is not a relative path inside ComfyUI's input folder" in message
    _, message = refusal(comfy, folder="probe_link")
    assert "leaves ComfyUI's input folder" in message and str(comfy.outside_input) not in message


@pytest.mark.parametrize("folder, says", [
    ("probe_lonely", "class folder input/probe_lonely/cat holds 1 image: a train/test split needs at least 2"),
    ("probe_one_class", "holds 1 class folder(s) with images: the probe needs at least 2"),
    ("probe_broken", "input/probe_broken/one/2.png is not a readable image"),
    ("probe_missing", "no folder 'probe_missing' in ComfyUI's input folder"),
])
def test_a_folder_the_probe_cannot_use_is_refused_naming_the_problem(comfy, folder, says):
    kind, message = refusal(comfy, folder=folder)
    assert kind == "InputError" and "\n" not in message
    assert says in message


def test_an_unknown_site_is_refused_listing_the_models_sites(comfy):
    kind, message = refusal(comfy, sites=f"{SITES[0]}, double_blocks.9:image")
    assert kind == "SiteError" and "\n" not in message
    assert "double_blocks.9:image" in message and SITES[1] in message
    kind, message = refusal(comfy, sites=" , ")
    assert kind == "InputError" and "sites is empty" in message


@pytest.mark.parametrize("levels, says", [
    ("0.1, 1.5", "level '1.5' is outside 0..1"),
    ("-0.2", "level '-0.2' is outside 0..1"),
    ("nan", "level 'nan' is outside 0..1"),
    ("0.5, half", "level 'half' is not a number"),
    (" ", "levels is empty"),
])
def test_a_level_outside_sampling_is_refused_in_one_line(comfy, levels, says):
    kind, message = refusal(comfy, levels=levels)
    assert kind == "InputError" and "\n" not in message
    assert says in message


def test_every_level_becomes_a_noise_level_of_the_model_inside_its_sigma_range(comfy):
    import importlib

    import nodes

    probe = importlib.import_module(f"{comfy.plugin_module().__name__}.nodes.probe_nodes")
    model = nodes.NODE_CLASS_MAPPINGS["SAELoadModelOrganism"].execute("flux", "")[0]
    sigmas = [probe.level_sigma(model, level) for level in (0.0, 0.25, 0.5, 1.0)]
    # the Flux organism is rectified flow with shift 1: sigma = 1 - progress, clamped to (0, 1]
    assert sigmas[1:3] == pytest.approx([0.75, 0.5])
    assert sigmas[0] == pytest.approx(1.0) and 0 < sigmas[3] < 0.01
