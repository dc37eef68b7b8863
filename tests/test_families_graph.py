"""Every model family through ComfyUI's execution engine: Capture, Steer and Record Features in one graph.

The sampler tests (``test_comfy_families.py``) drive the adapters directly; these run the user's path:
a graph validated and executed by ComfyUI's own ``PromptExecutor``, with our nodes between a tiny
random-weight model of each family and a KSampler at cfg 2. Test-only nodes bring the model, its
conditioning and latent into the graph.
"""
from __future__ import annotations

import gc
import hashlib
import importlib
import itertools

import pytest
import torch

from tiny_comfy_models import TINY_FAMILIES, family_conditioning, family_latent, tiny_family_patcher

NAMES = sorted(TINY_FAMILIES)
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 2
_models: dict[str, object] = {}
_runs = itertools.count()
KEPT: dict[str, object] = {}


def family_model(name: str):
    if name not in _models:
        _models[name] = tiny_family_patcher(name)
    return _models[name]


class SAETestFamilyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (NAMES,)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, family):
        return (family_model(family),)


class SAETestFamilyInputs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (NAMES,), "run": ("INT", {"default": 0, "min": 0, "max": 1 << 30})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    def make(self, family, run):
        spec = TINY_FAMILIES[family]
        positive, negative = family_conditioning(spec)
        return (positive, negative, {"samples": family_latent(spec)})


class SAETestFamilyKeep:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "label": ("STRING", {})},
                "optional": {"capture": ("SAE_CAPTURE",), "recording": ("SAE_RECORDING",)}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def keep(self, samples, label, capture=None, recording=None):
        KEPT[label] = {"capture": capture, "recording": recording}
        x = samples["samples"].contiguous()
        return {"ui": {"sha256": [hashlib.sha256(x.numpy().tobytes()).hexdigest()]}}


TEST_NODES = {cls.__name__: cls for cls in (SAETestFamilyModel, SAETestFamilyInputs, SAETestFamilyKeep)}


@pytest.fixture(scope="module")
def comfy(comfyui, tmp_path_factory):
    comfyui.load_plugin_nodes()
    import folder_paths
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
    sae_dir = tmp_path_factory.mktemp("models_sae_families")
    folder_paths.add_model_folder_path("sae", str(sae_dir), is_default=True)
    comfyui.sae_dir = sae_dir
    yield comfyui
    KEPT.clear()  # ModelPatchers must go while ComfyUI is still importable, not at interpreter exit
    _models.clear()
    gc.collect()


def plugin_part(comfy, name: str):
    """The plugin's own module (its classes, not a second copy's)."""
    return importlib.import_module(f"{comfy.plugin_module().__name__}.{name}")


def image_site(comfy, name: str):
    """The family's first image site (as the plugin resolves it), and its width."""
    adapters = plugin_part(comfy, "nodes.adapters")
    model = family_model(name)
    site = next(s for s in adapters.adapter_for(model).available_sites(model) if s.stream == "image")
    return site.name, int(site.extra["d"])


def dictionary_file(comfy, name: str, site: str, width: int) -> str:
    core = plugin_part(comfy, "sae_core")
    sae = core.SparseAutoencoder(width, 16, 4, site=core.Site(TINY_FAMILIES[name].family, *site.split(":")), seed=3)
    file = f"{name}_probe.safetensors"
    core.save_dictionary(sae, comfy.sae_dir / file)
    return file


def graph(name: str, site: str, dictionary: str, strength: float, label: str) -> dict:
    """Model -> Capture (memory) -> Steer -> Record Features -> KSampler -> kept latent, capture and recording."""
    return {
        "1": {"class_type": "SAETestFamilyModel", "inputs": {"family": name}},
        "2": {"class_type": "SAETestFamilyInputs", "inputs": {"family": name, "run": next(_runs)}},
        "5": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": dictionary, "hub_id": ""}},
        "10": {"class_type": "SAECaptureActivations", "inputs": {
            "model": ["1", 0], "site": site, "window_start": 0.0, "window_end": 1.0, "token_fraction": 1.0,
            "cond_only": True, "folder": "", "dtype": "float32", "destination": "memory", "max_vectors": 1_000_000}},
        "11": {"class_type": "SAESteer", "inputs": {
            "model": ["10", 0], "dictionary": ["5", 0], "site": site, "mode": "add", "features": "3",
            "strength": strength, "units": "raw", "window_start": 0.0, "window_end": 1.0, "cond_only": True}},
        "12": {"class_type": "SAERecordFeatures", "inputs": {
            "model": ["11", 0], "dictionary": ["5", 0], "site": site, "window_start": 1.0, "window_end": 1.0}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["12", 0], "seed": 0, "steps": STEPS, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["2", 2], "denoise": 1.0}},
        "4": {"class_type": "SAETestFamilyKeep", "inputs": {
            "samples": ["3", 0], "label": label, "capture": ["10", 1], "recording": ["12", 1]}},
    }


def unpatched(name: str) -> dict:
    return {
        "1": {"class_type": "SAETestFamilyModel", "inputs": {"family": name}},
        "2": {"class_type": "SAETestFamilyInputs", "inputs": {"family": name, "run": next(_runs)}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": STEPS, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["2", 2], "denoise": 1.0}},
        "4": {"class_type": "SAETestFamilyKeep", "inputs": {"samples": ["3", 0], "label": f"{name}-plain"}},
    }


def sha(history: dict) -> str:
    return history["outputs"]["4"]["sha256"][0]


@pytest.mark.parametrize("name", NAMES)
def test_capture_steer_and_record_run_in_one_graph_for_every_family(comfy, name):
    site, width = image_site(comfy, name)
    dictionary = dictionary_file(comfy, name, site, width)
    plain = sha(comfy.execute_graph(unpatched(name)))

    idle = sha(comfy.execute_graph(graph(name, site, dictionary, 0.0, f"{name}-idle")))
    assert idle == plain  # capture, a zero-strength steer and recording leave sampling bit-identical

    steered = sha(comfy.execute_graph(graph(name, site, dictionary, 4.0, f"{name}-steered")))
    assert steered != plain
    assert sha(comfy.execute_graph(unpatched(name))) == plain  # nothing leaked into the shared model

    kept = KEPT[f"{name}-steered"]
    rows = kept["capture"].buffer.tensors()
    assert rows["activations"].shape[1] == width and len(rows["activations"]) > 0
    assert torch.isfinite(rows["activations"]).all()
    assert set(rows["timestep"].unique().tolist()) and not torch.isnan(rows["timestep"]).any()  # sigmas are known
    recording = kept["recording"].require()
    assert recording.shape[1] == 16 and recording.sum() > 0  # dense features of the last step's tokens
