"""Paths sent to the REAL ComfyUI server (main.py, POST /prompt): nothing outside models/sae is read or named.

Load Dictionary's ``hub_id`` takes Hub ids only and its ``dictionary`` only the files models/sae lists; Train
Dictionary's ``shards_folder`` only folders inside ComfyUI's output folder. Each prompt below tries to reach
out of those, among others to a real dictionary file and a real shards folder saved outside them. For each,
the prompt is refused when queued or its run fails with one of our errors; the error text the server gives
back (the /prompt answer, or /history's messages) names no path of the server's own beyond what the user
typed (not its folders, the home folder, the Hugging Face cache, the plugin), lists no folder, and the
dictionary outside models/sae is not loaded.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from comfyui_harness import REPO_ROOT, request_json
from sae_core.config import DictionaryConfig, TrainConfig
from sae_core.fileformat import save_dictionary
from sae_core.shards import ShardWriter
from sae_core.sites import Site
from sae_core.train import train_dictionary

HISTORY_TIMEOUT_S = 60.0
PROJECT_ERROR = re.compile(r"diffusion_sae\.[A-Za-z]+Error")
MARKER = "listing_marker_that_no_error_may_show.txt"
"""A file beside the outside dictionary: an error that lists that folder would show its name."""
D_IN = 16


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> dict[str, Path]:
    """A real dictionary (file and folder) and a real shards folder, outside the server's models/sae and output."""
    root = tmp_path_factory.mktemp("outside_models_sae")
    acts = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(0))
    config = TrainConfig(DictionaryConfig(kind="topk", k=2, n_latents=32), total_steps=2, batch_size=64,
                         warmup_steps=1)
    folder = root / "dictionary"
    save_dictionary(train_dictionary(acts, config).dictionary, folder / "real.safetensors")
    (folder / MARKER).write_text("")
    with ShardWriter(root / "shards", Site("flux", "double_blocks.0", "image"), dtype=torch.float32) as writer:
        writer.add(acts, 0, None, 1.0)
    return {"root": root, "file": folder / "real.safetensors", "folder": folder, "shards": root / "shards"}


@pytest.fixture(scope="module")
def server_paths(comfyui_server) -> dict[str, Path]:
    """The server's base folder (from /system_stats' argv) and its models/sae."""
    _, stats = request_json(comfyui_server + "/system_stats")
    argv = stats["system"]["argv"]
    base = Path(argv[argv.index("--base-directory") + 1]).resolve()
    return {"base": base, "models_sae": base / "models" / "sae"}


def queue(url: str, graph: dict) -> tuple[str, str]:
    """``(outcome, error text)``: "refused" with the /prompt answer, or the run's status with its /history
    messages. An execution error's traceback is left out: ComfyUI adds it to every node's error (it names the
    server's source files whatever the node), while the type and message are what the node tells the user."""
    status, answer = request_json(url + "/prompt", {"prompt": graph, "client_id": "sae-path-tests"})
    if status != 200:
        return "refused", json.dumps(answer)
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + HISTORY_TIMEOUT_S
    while time.monotonic() < deadline:
        _, history = request_json(f"{url}/history/{prompt_id}")
        entry = history.get(prompt_id, {})
        if entry.get("status", {}).get("completed") is not None:
            messages = [(event, {key: value for key, value in data.items() if key != "traceback"})
                        for event, data in entry["status"]["messages"]]
            return entry["status"]["status_str"], json.dumps({"messages": messages, "outputs": entry["outputs"]})
        time.sleep(0.05)  # bounded polling of the server's queue
    raise TimeoutError(f"prompt {prompt_id} did not finish within {HISTORY_TIMEOUT_S:.0f} s")


def load_graph(dictionary: str = "(none)", hub_id: str = "") -> dict:
    return {"1": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": dictionary, "hub_id": hub_id}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def train_graph(shards_folder: str) -> dict:
    return {"1": {"class_type": "SAETrainDictionary", "inputs": {
        "kind": "topk", "k": 2, "expansion": 2, "steps": 2, "lr": 0.001, "batch_size": 16, "name": "escaped",
        "shards_folder": shards_folder}}}


def typed(value: str, outside: dict[str, Path]) -> str:
    """A case's value with its placeholder ({root}, {file}, {folder}, {shards}) filled in."""
    return value.format(**{key: str(path) for key, path in outside.items()})


def unnamed_paths(text: str, value: str, outside: dict[str, Path], server: dict[str, Path]) -> list[str]:
    """The server's own paths and folder listings that ``text`` (JSON) shows beyond ``value`` (what the user
    typed, quoted as an input or in a message) and models/sae."""
    from huggingface_hub import constants

    shown = text.replace(str(server["models_sae"]), "")
    for echo in (json.dumps(value), json.dumps(repr(value))[1:-1]):
        shown = shown.replace(echo, "")
    private = [p for p in (server["base"], outside["root"], Path.home(), REPO_ROOT, Path(constants.HF_HUB_CACHE))
               if len(p.parts) > 2 or (len(p.parts) == 2 and len(p.name) > 3)]  # not "/" nor a short word
    hidden = [p.name for p in Path.home().iterdir() if p.name.startswith(".") and len(p.name) > 5]
    listed = [MARKER, "passwd", "hostname", *hidden]
    return [str(p) for p in private if str(p) in shown] + [name for name in listed if name in shown]


HUB_IDS = ["~", "/etc", "../../..", "..", "{file}", "{folder}", "C:\\x", "hf://../../x", "~/.cache", "{root}/../.."]
DICTIONARY_FILES = ["../x.safetensors", "{file}", "/etc/passwd", "../../../../etc/passwd", "../sae/../x.safetensors"]
SHARDS_FOLDERS = ["{shards}", "../..", "~", "..", "/tmp", "sae_activations/../../{shards}"]
CASES = ([("hub_id", v) for v in HUB_IDS] + [("dictionary", v) for v in DICTIONARY_FILES]
         + [("shards_folder", v) for v in SHARDS_FOLDERS])


@pytest.mark.parametrize("input_name,value", CASES, ids=[f"{name}={value}" for name, value in CASES])
def test_a_path_out_of_models_sae_or_output_is_refused_and_the_error_names_nothing_of_the_server(
        comfyui_server, server_paths, outside, input_name, value):
    value = typed(value, outside)
    graph = train_graph(value) if input_name == "shards_folder" else load_graph(**{input_name: value})
    outcome, text = queue(comfyui_server, graph)
    assert outcome in ("refused", "error"), (outcome, text)
    if outcome == "error":
        (failure,) = [data for event, data in json.loads(text)["messages"] if event == "execution_error"]
        assert PROJECT_ERROR.fullmatch(failure["exception_type"]), failure
        assert "\n" not in failure["exception_message"].strip()
    assert f"d_in={D_IN}" not in text  # the dictionary outside models/sae was not loaded
    assert not unnamed_paths(text, value, outside, server_paths), text


def test_the_same_server_loads_a_dictionary_from_models_sae(comfyui_server, server_paths, outside):
    """The refusals above are not a broken node: a file that models/sae lists loads."""
    inside = server_paths["models_sae"] / "path_escape_inside.safetensors"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(outside["file"].read_bytes())
    try:
        outcome, text = queue(comfyui_server, load_graph(dictionary=inside.name))
    finally:
        inside.unlink()
    assert outcome == "success", text
    assert f"d_in={D_IN}" in text
