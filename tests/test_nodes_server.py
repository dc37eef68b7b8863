"""Our nodes through a real ComfyUI server (main.py): /object_info, POST /prompt, /history, errors, no leaks.

The server's base dir gets a second custom-node folder, ``sae_test_nodes``, serving the test-only nodes of
``test_nodes_graph.py`` (tiny Flux model, its inputs, a latent fingerprint), and a ``models/sae`` folder with
a dictionary of the tiny model's width.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

import comfyui_harness
from comfyui_harness import request_json
from test_nodes_graph import latent_sha, sampling_graph, steered_graph

TESTS = Path(__file__).resolve().parent
HISTORY_TIMEOUT_S = 60.0

TEST_NODE_PACKAGE = f'''"""Test-only nodes for Diffusion SAE's server tests."""
import sys
sys.path.insert(0, {str(TESTS)!r})
from test_nodes_graph import TEST_NODES as NODE_CLASS_MAPPINGS
'''


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    comfyui.load_plugin_nodes()
    import torch

    core = sys.modules[comfyui.plugin_module().__name__ + ".sae_core"]
    base = tmp_path_factory.mktemp("comfyui-nodes-server")
    (base / "custom_nodes" / "sae_test_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "sae_test_nodes" / "__init__.py").write_text(TEST_NODE_PACKAGE)
    (base / "models" / "sae").mkdir(parents=True)
    acts = torch.randn(1024, 64, generator=torch.Generator().manual_seed(0))
    config = core.TrainConfig(core.DictionaryConfig(kind="topk", k=4, n_latents=128), total_steps=10, batch_size=256,
                              warmup_steps=1)
    core.save_dictionary(core.train_dictionary(acts, config).dictionary, base / "models" / "sae" / "tiny.safetensors")
    with comfyui_harness.comfyui_server(base) as url:
        yield url


def run_prompt(url: str, graph: dict) -> dict:
    """POST /prompt and wait for its /history entry."""
    status, answer = request_json(url + "/prompt", {"prompt": graph, "client_id": "sae-tests"})
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + HISTORY_TIMEOUT_S
    while time.monotonic() < deadline:
        _, history = request_json(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.05)  # bounded polling of the server's queue
    raise TimeoutError(f"prompt {prompt_id} did not finish within {HISTORY_TIMEOUT_S:.0f} s")


def test_object_info_lists_every_node_of_ours_described_with_a_tooltip_on_every_input(comfyui, server):
    _, info = request_json(server + "/object_info")
    ours = {node.GET_SCHEMA().node_id for node in comfyui.plugin_module().nodes.NODES}
    assert ours <= set(info), ours - set(info)
    for node_id in ours:
        node = info[node_id]
        assert node["python_module"] == "custom_nodes.diffusion_sae" and node["category"].startswith("Diffusion SAE/")
        assert len(node["description"]) > 40, node_id
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert inputs and list(inputs) == [*node["input_order"]["required"], *node["input_order"].get("optional", [])]
        untold = [name for name, (_, spec) in inputs.items() if len(spec.get("tooltip", "")) < 10]
        assert not untold, (node_id, untold)
    assert info["SAESteer"]["display_name"] == "Steer"
    assert "tiny.safetensors" in info["SAELoadDictionary"]["input"]["required"]["dictionary"][1]["options"]


def test_a_steered_prompt_runs_and_reports_through_history(server):
    entry = run_prompt(server, steered_graph("tiny.safetensors", 1.0))
    assert entry["status"]["status_str"] == "success"
    assert len(latent_sha(entry)) == 64


def test_bad_prompts_get_errors_and_the_server_keeps_serving(server):
    invalid = steered_graph("tiny.safetensors", 1.0)
    invalid["11"]["inputs"]["mode"] = "explode"
    status, answer = request_json(server + "/prompt", {"prompt": invalid})
    assert status == 400 and "11" in answer["node_errors"]

    failing = run_prompt(server, steered_graph("tiny.safetensors", 1.0, features="4096"))
    assert failing["status"]["status_str"] == "error"
    assert "out of range" in json.dumps(failing["status"]["messages"])

    failing = run_prompt(server, steered_graph("tiny.safetensors", 1.0, site="double_blocks.9:image"))
    (error,) = [data for event, data in failing["status"]["messages"] if event == "execution_error"]
    assert error["node_type"] == "SAESteer" and error["exception_type"] == "diffusion_sae.SiteError"
    assert error["exception_message"].startswith("unknown site double_blocks.9:image")

    assert run_prompt(server, sampling_graph(run=1))["status"]["status_str"] == "success"


def test_alternating_steered_and_unsteered_runs_leak_no_patches(server):
    plain, steered = set(), set()
    for run in range(50):  # 100 prompts; `run` defeats ComfyUI's output cache, the tiny model is shared
        plain.add(latent_sha(run_prompt(server, sampling_graph(run=100 + run))))
        steered.add(latent_sha(run_prompt(server, steered_graph("tiny.safetensors", 1.0, run=100 + run))))
    assert len(plain) == 1 and len(steered) == 1
    assert plain != steered
