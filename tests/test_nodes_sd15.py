"""The nodes on a tiny SD1.5 U-Net (ComfyUI's own UNetModel), through ComfyUI's execution engine:
capture at the bottleneck, train, then steer with the trained dictionary."""
from __future__ import annotations

import pytest

from test_image_capture import SAETestTinySD15
from test_nodes_graph import (SAETestKeepLatent, _dictionary, _node_error, _sae_core, capture_node, comfy,  # noqa: F401
                              first_call, latent_sha)
from tiny_comfy_models import SD15_TEXT_WIDTH

SITE = "middle_block:residual"


class SAETestTinySD15Inputs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000}),
                             "run": ("INT", {"default": 0, "min": 0, "max": 1 << 30})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    def make(self, seed, run):
        import torch

        g = torch.Generator().manual_seed(seed)

        def cond():
            return [[torch.randn(1, 7, SD15_TEXT_WIDTH, generator=g), {}]]

        return (cond(), cond(), {"samples": torch.zeros(1, 4, 16, 16)})


@pytest.fixture(scope="module")
def sd15(comfy):  # noqa: F811
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update({"SAETestTinySD15": SAETestTinySD15, "SAETestTinySD15Inputs": SAETestTinySD15Inputs})
    return comfy


def graph(model_link, run=0, extra=None) -> dict:
    g = {
        "1": {"class_type": "SAETestTinySD15", "inputs": {"seed": 0}},
        "2": {"class_type": "SAETestTinySD15Inputs", "inputs": {"seed": 1, "run": run}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": list(model_link), "seed": 0, "steps": 3, "cfg": 2.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["2", 2], "denoise": 1.0}},
        "4": {"class_type": "SAETestKeepLatent", "inputs": {"samples": ["3", 0]}},
    }
    g.update(extra or {})
    return g


@pytest.fixture(scope="module")
def trained(sd15):
    capture_and_train = graph(("10", 0), extra={
        "10": {"class_type": "SAECaptureActivations", "inputs": {
            "model": ["1", 0], "site": SITE, "window_start": 0.0, "window_end": 1.0, "token_fraction": 1.0,
            "cond_only": True, "folder": "", "dtype": "float32", "destination": "memory", "max_vectors": 100_000}},
        "11": {"class_type": "SAETrainDictionary", "inputs": {
            "capture": ["10", 1], "after": ["3", 0], "kind": "topk", "k": 4, "expansion": 2, "steps": 10,
            "lr": 0.001, "batch_size": 8, "name": "sd15_bottleneck"}},
    })
    sd15.execute_graph(capture_and_train)
    return "sd15_bottleneck.safetensors"


def steer(dictionary: str, strength: float, run: int, features: str = "1") -> dict:
    return graph(("11", 0), run=run, extra={
        "10": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": dictionary, "hub_id": ""}},
        "11": {"class_type": "SAESteer", "inputs": {
            "model": ["1", 0], "dictionary": ["10", 0], "site": SITE, "mode": "add", "features": features,
            "strength": strength, "units": "token_norm", "window_start": 0.0, "window_end": 1.0, "cond_only": True}},
    })


def test_a_bottleneck_dictionary_trains_from_an_sd15_capture(sd15, trained):
    header = _sae_core(sd15).read_header(sd15.sae_dir / trained)
    assert header["site"]["family"] == "sd15" and header["site"]["block"] == "middle_block"
    assert header["d_in"] == 64


def test_sd15_zero_strength_steer_is_bit_identical_and_leaves_nothing_behind(sd15, trained):
    plain = latent_sha(sd15.execute_graph(graph(("1", 0), run=1)))
    assert latent_sha(sd15.execute_graph(steer(trained, 0.0, run=2))) == plain
    sd15.execute_graph(steer(trained, 1.0, run=3))
    assert latent_sha(sd15.execute_graph(graph(("1", 0), run=4))) == plain  # nothing leaked into the model


def test_sd15_steer_add_moves_the_bottleneck_by_strength_times_the_feature_direction(sd15, trained):
    """A capture after the steer, at the same site, against one on the unsteered model: the first model call
    sees the same input in both, so they differ by exactly the edit."""
    plain_folder, plain_capture = capture_node(("1", 0), site=SITE)
    plain = sd15.execute_graph(graph(("20", 0), run=5, extra={"20": plain_capture}))
    steered_graph = steer(trained, 2.0, run=6)
    steered_graph["11"]["inputs"]["units"] = "raw"
    steered_folder, steered_graph["20"] = capture_node(("11", 0), site=SITE)
    steered_graph["3"]["inputs"]["model"] = ["20", 0]
    steered = sd15.execute_graph(steered_graph)
    moved = first_call(steered_folder)[0] - first_call(plain_folder)[0]
    direction = _dictionary(sd15, trained).direction(1)
    assert moved.shape == (64, 64) and direction.norm() > 0.1  # 8x8 tokens of width 64
    assert moved.sub(2.0 * direction).abs().max() < 1e-4
    assert latent_sha(steered) != latent_sha(plain)


def test_a_flux_site_on_sd15_is_a_node_error_listing_the_unet_sites(sd15, trained):
    message = _node_error(sd15, graph(("11", 0), extra={
        "10": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": trained, "hub_id": ""}},
        "11": {"class_type": "SAESteer", "inputs": {
            "model": ["1", 0], "dictionary": ["10", 0], "site": "double_blocks.0:image", "mode": "add", "features": "1",
            "strength": 1.0, "units": "token_norm", "window_start": 0.0, "window_end": 1.0, "cond_only": True}}}))
    assert "middle_block" in message
