"""Our nodes in real ComfyUI graphs, run in-process with ComfyUI's own validator and executor.

A tiny Flux model enters graphs through test-only nodes (defined here, also used by the server tests):
``SAETestTinyFlux`` -> MODEL, ``SAETestTinyInputs`` -> positive/negative CONDITIONING + LATENT,
``SAETestKeepLatent`` -> the sampled latent's sha256 in the node's UI output, ``SAETestLatentToImage``,
``SAETestKeepRecording`` -> keeps a Record Features recording for the test to read.

Edits are checked by value: a Capture Activations node after a Steer, at the same site, stores what the
steered site put out, and the first model call of a steered run sees the same site input as the
unsteered run's (same model, noise and prompts), so the two captures differ by exactly the edit.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

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


KEPT_RECORDINGS: dict = {}  # label -> the SAE_RECORDING that SAETestKeepRecording saw


class SAETestKeepRecording:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"recording": ("SAE_RECORDING",), "samples": ("LATENT",), "label": ("STRING", {})}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def keep(self, recording, samples, label):
        KEPT_RECORDINGS[label] = recording
        return {}


TEST_NODES = {cls.__name__: cls for cls in (SAETestTinyFlux, SAETestTinyInputs, SAETestKeepLatent, SAETestLatentToImage,
                                            SAETestKeepRecording)}


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


def steer_nodes(dictionary: str, strength: float, features="0", site=SITE, mode="add", model_link=("1", 0),
                units="token_norm") -> dict:
    return {
        "10": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": dictionary, "hub_id": ""}},
        "11": {"class_type": "SAESteer", "inputs": {
            "model": list(model_link), "dictionary": ["10", 0], "site": site, "mode": mode, "features": features,
            "strength": strength, "units": units, "window_start": 0.0, "window_end": 1.0, "cond_only": True}},
    }


def steered_graph(dictionary: str, strength: float, run=0, **kw) -> dict:
    graph = sampling_graph(model_link=("11", 0), run=run)
    graph.update(steer_nodes(dictionary, strength, **kw))
    return graph


def latent_sha(history: dict) -> str:
    return history["outputs"]["4"]["sha256"][0]


_folders = itertools.count()


def capture_node(model_link, cond_only: bool = True, token_fraction: float = 1.0, site: str = SITE) -> tuple[str, dict]:
    """A Capture Activations node at ``site`` into a new shards folder: ``(folder, node inputs)``."""
    folder = f"sae_activations/graph_{next(_folders)}"
    return folder, {"class_type": "SAECaptureActivations", "inputs": {
        "model": list(model_link), "site": site, "window_start": 0.0, "window_end": 1.0,
        "token_fraction": token_fraction, "cond_only": cond_only, "folder": folder, "dtype": "float32"}}


def shard_rows(folder: Path) -> dict:
    """All rows of a capture folder, in order: activations, sample_id, token, timestep (the call's sigma)."""
    from safetensors.torch import load_file

    rows: dict = {}
    for path in sorted(Path(folder).glob("shard_*.safetensors")):
        for key, value in load_file(str(path)).items():
            rows.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in rows.items()}


def first_call(folder: str, rows: int = 1):
    """The ``(rows, tokens, d)`` vectors a capture stored for the first model call (the highest sigma)."""
    import folder_paths

    stored = shard_rows(Path(folder_paths.get_output_directory()) / folder)
    first = stored["activations"][stored["timestep"] == stored["timestep"].max()]
    return first.reshape(rows, -1, first.shape[-1])


def steer_then_capture(strength: float, features: str, mode: str = "add", units: str = "raw",
                       capture_cond_only: bool = True, **steer_inputs) -> tuple[dict, str]:
    """tiny_db0 Steer -> Capture at the same site -> KSampler: ``(graph, capture folder)``."""
    graph = sampling_graph(model_link=("20", 0))
    graph.update(steer_nodes("tiny_db0.safetensors", strength, features=features, mode=mode, units=units))
    graph["11"]["inputs"].update(steer_inputs)
    folder, graph["20"] = capture_node(("11", 0), cond_only=capture_cond_only)
    return graph, folder


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


def _dictionary(comfy, name: str):
    return _sae_core(comfy).load_dictionary(comfy.sae_dir / name).requires_grad_(False)


def _codes(dictionary, tokens, feature: int):
    """Each token's activation of ``feature`` (0 where the dictionary does not select it)."""
    return dictionary.dense_codes(tokens)[..., feature].unsqueeze(-1)


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
    assert reader.extra["capture"] == {"source": "comfyui", "window": None, "token_fraction": 0.5, "cond_only": True,
                                       "seed": 0}  # provenance in the headless capture's layout


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


def test_load_dictionary_describes_the_file_and_shows_it_on_the_node(comfy, captured):
    import nodes

    loaded = nodes.NODE_CLASS_MAPPINGS["SAELoadDictionary"].execute("tiny_db0.safetensors")
    sae, description = loaded.result
    assert sae.d_in == 64 and sae.n_latents == 128
    assert "topk" in description and "d_in=64" in description and "n_latents=128" in description
    assert loaded.ui.as_dict() == {"text": (description,)}


# ----------------------------------------------------------------------------- capture and record, by value


@contextlib.contextmanager
def site_probe(comfy) -> Iterator[list[dict]]:
    """Per model call of the tiny Flux: which rows were the positive prompt's, the sigma, and what its first
    double block put out on the image stream (SITE), read by PyTorch hooks on ComfyUI's own modules."""
    net = SAETestTinyFlux().load(0)[0].model.diffusion_model  # the instance the graphs sample (built once)
    calls: list[dict] = []

    def before_call(module, args, kwargs):
        options = kwargs["transformer_options"]
        calls.append({"cond": [c == 0 for c in options["cond_or_uncond"]], "sigma": float(options["sigmas"][0])})

    def after_block(module, args, output):
        calls[-1]["image"] = output[0].detach().clone()

    handles = [net.register_forward_pre_hook(before_call, with_kwargs=True),
               net.double_blocks[0].register_forward_hook(after_block)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def test_capture_stores_exactly_the_prompt_rows_tokens_the_site_put_out_with_each_calls_sigma(comfy):
    import folder_paths

    graph = sampling_graph(model_link=("10", 0))
    folder, graph["10"] = capture_node(("1", 0), cond_only=True, token_fraction=0.5)
    with site_probe(comfy) as calls:
        comfy.execute_graph(graph)
    stored = shard_rows(Path(folder_paths.get_output_directory()) / folder)
    assert len(calls) == STEPS and all(call["cond"].count(True) == 1 for call in calls)  # cfg 2: cond + uncond rows
    half = (LATENT_SIZE // 2) ** 2 // 2
    assert len(stored["activations"]) == STEPS * half
    for i, call in enumerate(calls):
        rows = slice(i * half, (i + 1) * half)
        tokens = stored["token"][rows]
        seen = call["image"][call["cond"].index(True)]
        assert stored["activations"][rows].equal(seen[tokens])
        assert (stored["timestep"][rows] == call["sigma"]).all()
        assert stored["sample_id"][rows].eq(0).all()


def record_features_graph(window_start: float, window_end: float) -> dict:
    """tiny_db0 -> Record Features (node 11: MODEL, SAE_RECORDING) -> KSampler; add nodes >= 12."""
    graph = sampling_graph(model_link=("11", 0))
    graph.update({
        "10": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": "tiny_db0.safetensors", "hub_id": ""}},
        "11": {"class_type": "SAERecordFeatures", "inputs": {
            "model": ["1", 0], "dictionary": ["10", 0], "site": SITE, "window_start": window_start,
            "window_end": window_end}},
    })
    return graph


def test_record_features_activations_are_the_dictionarys_codes_of_the_sites_last_tokens(comfy, captured):
    graph = record_features_graph(0.0, 1.0)
    graph["12"] = {"class_type": "SAETestKeepRecording", "inputs": {"recording": ["11", 1], "samples": ["3", 0],
                                                                   "label": "record"}}
    with site_probe(comfy) as calls:
        comfy.execute_graph(graph)
    last = calls[-1]
    tokens = last["image"][last["cond"].index(True)]
    dictionary = _dictionary(comfy, "tiny_db0.safetensors")
    recorded = KEPT_RECORDINGS["record"].activations
    assert recorded.shape == (16, dictionary.n_latents) and recorded.count_nonzero() > 0
    assert recorded.equal(dictionary.dense_codes(tokens).float())


# ----------------------------------------------------------------------------- steer


@pytest.fixture(scope="module")
def unsteered(comfy, captured) -> dict:
    """The unsteered run's site tokens at the first model call: the prompt's row and all rows, in call order."""
    graph = sampling_graph(model_link=("21", 0))
    cond_folder, graph["20"] = capture_node(("1", 0), cond_only=True)
    all_folder, graph["21"] = capture_node(("20", 0), cond_only=False)
    history = comfy.execute_graph(graph)
    cond, both = first_call(cond_folder)[0], first_call(all_folder, rows=2)
    return {"cond": cond, "rows": both, "cond_row": [bool(row.equal(cond)) for row in both].index(True),
            "sha": latent_sha(history)}


@pytest.fixture(scope="module")
def firing(comfy, unsteered) -> tuple[int, torch.Tensor]:
    """The feature of tiny_db0 that fires on the most of the unsteered prompt's tokens, and where it fires."""
    dictionary = _dictionary(comfy, "tiny_db0.safetensors")
    feature = int((dictionary.dense_codes(unsteered["cond"]) > 0).sum(0).argmax())
    fires = _codes(dictionary, unsteered["cond"], feature).squeeze(-1) > 0
    assert fires.any()
    return feature, fires


def test_zero_strength_steer_is_bit_identical(comfy, captured):
    plain = latent_sha(comfy.execute_graph(sampling_graph()))
    assert latent_sha(comfy.execute_graph(steered_graph("tiny_db0.safetensors", 0.0))) == plain


def test_steer_add_moves_the_prompts_tokens_by_strength_times_the_feature_direction(comfy, unsteered):
    graph, folder = steer_then_capture(2.0, "3", mode="add")
    history = comfy.execute_graph(graph)
    direction = _dictionary(comfy, "tiny_db0.safetensors").direction(3)
    moved = first_call(folder)[0] - unsteered["cond"]
    assert direction.norm() > 0.1
    assert moved.sub(2.0 * direction).abs().max() < 1e-5
    assert latent_sha(history) != unsteered["sha"]  # the edit reaches the sample


def test_steer_clamp_sets_the_features_activation_to_the_strength_and_keeps_the_rest(comfy, unsteered, firing):
    dictionary, (feature, _) = _dictionary(comfy, "tiny_db0.safetensors"), firing
    graph, folder = steer_then_capture(1.5, str(feature), mode="clamp")
    comfy.execute_graph(graph)
    plain = unsteered["cond"]
    expected = plain + (1.5 - _codes(dictionary, plain, feature)) * dictionary.direction(feature)
    assert first_call(folder)[0].sub(expected).abs().max() < 1e-5


def test_steer_ablate_removes_the_features_activation_where_it_fires_and_nothing_else(comfy, unsteered, firing):
    dictionary, (feature, fires) = _dictionary(comfy, "tiny_db0.safetensors"), firing
    plain = unsteered["cond"]
    graph, folder = steer_then_capture(1.0, str(feature), mode="ablate")
    comfy.execute_graph(graph)
    ablated = first_call(folder)[0]
    expected = plain - _codes(dictionary, plain, feature) * dictionary.direction(feature)
    assert ablated.sub(expected).abs().max() < 1e-5
    assert ablated[~fires].equal(plain[~fires])


def test_a_partial_mask_steers_the_tokens_inside_it_and_leaves_the_others_bit_identical(comfy, unsteered):
    graph, folder = steer_then_capture(2.0, "3", mode="add")
    graph.update({  # a 64x64 mask whose left half is 1: the left two of the 4x4 token grid's columns
        "30": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "31": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
        "32": {"class_type": "MaskComposite", "inputs": {"destination": ["30", 0], "source": ["31", 0], "x": 0,
                                                         "y": 0, "operation": "add"}},
    })
    graph["11"]["inputs"]["mask"] = ["32", 0]
    comfy.execute_graph(graph)
    inside = torch.arange(16) % 4 < 2  # token (row, col) is number 4 * row + col
    steered, plain = first_call(folder)[0], unsteered["cond"]
    direction = _dictionary(comfy, "tiny_db0.safetensors").direction(3)
    assert steered[~inside].equal(plain[~inside])
    assert (steered[inside] - plain[inside]).sub(2.0 * direction).abs().max() < 1e-5


def test_chained_steers_edit_in_order_the_second_seeing_the_firsts_result(comfy, unsteered, firing):
    dictionary, (ablated, _) = _dictionary(comfy, "tiny_db0.safetensors"), firing
    added = 0 if ablated else 1
    graph, folder = steer_then_capture(1.0, str(added), mode="add")
    graph["12"] = {"class_type": "SAESteer", "inputs": {
        **graph["11"]["inputs"], "model": ["11", 0], "features": str(ablated), "mode": "ablate"}}
    graph["20"]["inputs"]["model"] = ["12", 0]
    comfy.execute_graph(graph)
    first = unsteered["cond"] + dictionary.direction(added)
    assert _codes(dictionary, first, ablated).any()  # so the second steer has something to remove
    expected = first - _codes(dictionary, first, ablated) * dictionary.direction(ablated)
    assert first_call(folder)[0].sub(expected).abs().max() < 1e-5


def test_subtracting_from_the_uncond_half_moves_the_negative_prompts_row_the_other_way(comfy, unsteered):
    graph, folder = steer_then_capture(2.0, "3", mode="add", capture_cond_only=False, subtract_uncond=True)
    comfy.execute_graph(graph)
    direction = _dictionary(comfy, "tiny_db0.safetensors").direction(3)
    moved = first_call(folder, rows=2) - unsteered["rows"]
    cond = unsteered["cond_row"]
    assert moved[cond].sub(2.0 * direction).abs().max() < 1e-5
    assert moved[1 - cond].add(2.0 * direction).abs().max() < 1e-5


def test_a_sigma_range_outside_the_schedule_leaves_sampling_untouched(comfy, captured):
    plain = latent_sha(comfy.execute_graph(sampling_graph(run=7)))
    graph = steered_graph("tiny_db0.safetensors", 1.0, run=8)
    graph["11"]["inputs"].update(sigma_min=50.0, sigma_max=60.0)  # the schedule's sigmas are all <= 1
    assert latent_sha(comfy.execute_graph(graph)) == plain
    graph = steered_graph("tiny_db0.safetensors", 1.0, run=9)
    graph["11"]["inputs"].update(sigma_min=0.0, sigma_max=1.0)
    assert latent_sha(comfy.execute_graph(graph)) != plain


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
    config = core.TrainConfig(core.DictionaryConfig(kind="topk", k=4, n_latents=64), total_steps=5, batch_size=128,
                              warmup_steps=1)
    core.save_dictionary(core.train_dictionary(acts, config).dictionary, comfy.sae_dir / "narrow.safetensors")
    return "narrow.safetensors"


def _node_error(comfy, graph) -> str:
    with pytest.raises(comfy.GraphError) as raised:
        comfy.execute_graph(graph)
    return json.dumps(raised.value.details) + str(raised.value)


def test_dictionary_width_not_matching_the_site_is_a_node_error(comfy, narrow_dictionary):
    message = _node_error(comfy, steered_graph(narrow_dictionary, 1.0))
    assert "SAESteer" in message and "d_in=32" in message and "width 64" in message


def test_a_dictionary_file_missing_from_models_sae_is_refused_before_the_graph_runs(comfy, captured):
    with pytest.raises(comfy.GraphError) as raised:
        comfy.execute_graph(steered_graph("gone.safetensors", 1.0))
    (error,) = raised.value.details["node_errors"]["10"]["errors"]
    assert error["extra_info"]["input_name"] == "dictionary"
    assert "'gone.safetensors' is not in models/sae" in error["details"]


def test_load_dictionary_run_directly_takes_only_a_file_that_models_sae_lists(comfy, captured):
    """What validate_inputs refuses in a queued workflow, execute refuses too: no file by another path."""
    import nodes

    load = nodes.NODE_CLASS_MAPPINGS["SAELoadDictionary"]
    for name in ("../tiny_db0.safetensors", str(comfy.sae_dir / "tiny_db0.safetensors"), "(none)"):
        with pytest.raises(ValueError) as raised:
            load.execute(name)
        assert type(raised.value).__name__ == "InputError" and "models/sae" in str(raised.value)
    assert load.execute("tiny_db0.safetensors").result[0].d_in == 64


def train_from_folder(shards_folder: str) -> dict:
    return {"11": {"class_type": "SAETrainDictionary", "inputs": {
        "kind": "topk", "k": 4, "expansion": 2, "steps": 2, "lr": 0.001, "batch_size": 16, "name": "from_folder",
        "shards_folder": shards_folder}}}


def test_train_reads_a_shards_folder_only_inside_the_output_folder(comfy, captured, tmp_path):
    import shutil

    _, inside = captured
    outside = shutil.copytree(inside, tmp_path / "shards")  # real shards, outside ComfyUI's output folder
    for folder, reason in ((str(outside), "is not a relative path"), ("~", "is not a relative path"),
                           (f"../../../../../../../..{outside}", "leaves ComfyUI's output folder")):
        with pytest.raises(comfy.GraphError) as raised:
            comfy.execute_graph(train_from_folder(folder))
        failure = raised.value.details
        assert failure["exception_type"] == "diffusion_sae.InputError", failure
        assert failure["exception_message"].startswith(f"shards_folder {folder!r} {reason}")
    history = comfy.execute_graph(train_from_folder("sae_activations/graph_test"))
    assert "saved as from_folder.safetensors" in history["outputs"]["11"]["text"][0]


def test_a_missing_shards_folder_is_named_as_the_workflow_names_it(comfy, captured):
    import folder_paths

    with pytest.raises(comfy.GraphError) as raised:
        comfy.execute_graph(train_from_folder("sae_activations/never_captured"))
    message = raised.value.details["exception_message"]
    assert "'sae_activations/never_captured'" in message
    assert str(Path(folder_paths.get_output_directory()).resolve()) not in message


def test_feature_id_out_of_range_is_a_node_error(comfy, captured):
    message = _node_error(comfy, steered_graph("tiny_db0.safetensors", 1.0, features="0, 999"))
    assert "feature 999 is out of range" in message


def test_unknown_site_is_a_node_error_named_site_error_listing_the_sites(comfy, captured):
    with pytest.raises(comfy.GraphError) as raised:
        comfy.execute_graph(steered_graph("tiny_db0.safetensors", 1.0, site="double_blocks.7:image"))
    failure = raised.value.details  # ComfyUI's execution_error: what the user's error dialog shows
    assert failure["node_type"] == "SAESteer"
    assert failure["exception_type"] == "diffusion_sae.SiteError"  # short: not the plugin's folder path
    assert "unknown site double_blocks.7:image" in failure["exception_message"] and SITE in failure["exception_message"]


def test_empty_mask_is_a_node_error(comfy, captured):
    graph = steered_graph("tiny_db0.safetensors", 1.0)
    graph["12"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    graph["11"]["inputs"]["mask"] = ["12", 0]
    assert "mask is empty" in _node_error(comfy, graph)


# ----------------------------------------------------------------------------- inspect


def test_record_features_feeds_heatmap_and_top_features_which_show_their_results(comfy, captured):
    graph = record_features_graph(1.0, 1.0)
    graph.update({
        "12": {"class_type": "SAETestLatentToImage", "inputs": {"samples": ["3", 0]}},
        "13": {"class_type": "SAEFeatureHeatmap", "inputs": {"image": ["12", 0], "recording": ["11", 1],
                                                            "feature": 0, "opacity": 0.6}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
        "15": {"class_type": "SAETopFeatures", "inputs": {"image": ["12", 0], "recording": ["11", 1], "n": 5}},
        "16": {"class_type": "PreviewAny", "inputs": {"source": ["15", 0]}},
        "17": {"class_type": "PreviewImage", "inputs": {"images": ["15", 1]}},
        "18": {"class_type": "SAETestKeepRecording", "inputs": {"recording": ["11", 1], "samples": ["3", 0],
                                                               "label": "inspect"}},
    })
    outputs = comfy.execute_graph(graph)["outputs"]
    text = outputs["16"]["text"][0]
    means = KEPT_RECORDINGS["inspect"].activations.mean(0)
    listed = [int(line.split(":")[0]) for line in text.splitlines()]
    assert listed == means.topk(5).indices.tolist() and "fires on" in text
    assert outputs["15"]["text"] == [text] and outputs["15"]["images"]  # shown on the node itself
    assert outputs["13"]["images"] and outputs["14"]["images"] and outputs["17"]["images"]
    assert latent_sha({"outputs": outputs}) == latent_sha(comfy.execute_graph(sampling_graph()))  # recording only reads


# ----------------------------------------------------------------------------- example workflows


FILE_INPUTS = {"unet_name", "clip_name1", "clip_name2", "vae_name", "dictionary"}
MISSING_FILE_ERRORS = {"value_not_in_list", "custom_validation_failed"}
"""How ComfyUI reports a file a list input lacks: its own check (V1 nodes), or our nodes' validate_inputs."""


@pytest.mark.parametrize("path", sorted((REPO / "example_workflows" / "api").glob("*.json")), ids=lambda p: p.name)
def test_example_workflow_validates_apart_from_missing_model_files(comfy, path):
    """ComfyUI's validator accepts each example; the only errors allowed are model files this machine lacks."""
    import asyncio

    import execution

    prompt = json.loads(path.read_text())
    valid, error, _, node_errors = asyncio.run(execution.validate_prompt("example", prompt, None))
    problems = [
        (node, e) for node, entry in node_errors.items() for e in entry["errors"]
        if not (e["type"] in MISSING_FILE_ERRORS and e["extra_info"]["input_name"] in FILE_INPUTS)
    ]
    assert not problems, problems
    assert valid or error["type"] == "prompt_outputs_failed_validation"
    assert any(n["class_type"].startswith("SAE") for n in prompt.values())
