"""Bad inputs to every node of ours, through ComfyUI's own validator and executor (in process, tiny models).

Each case changes ONE input of a graph that works: a table of the mistakes users and scripts make (NaN,
infinities, negative, empty and huge values, wrong types sent through the API, paths that leave their
folder, odd tensors from other nodes) and a seeded random draw from the same kinds. A case must end in
one of three ways:

* refused when queued, by ComfyUI's validator (a value outside the widget's range, a wrong type) or by our
  ``validate_inputs``;
* failed while running with one of our errors: ComfyUI reports ``diffusion_sae.<Kind>Error`` and a one-line
  message;
* ran, using the value asked for (checked by value where the input's effect is known: the steer changes
  the sample or not, the shards land in the folder named, the image has the size asked for, ...).

Another exception type, a message of several lines, a wrong result or a case still running after
``HANG_S`` fails the node's test. ``DIFFUSION_SAE_FUZZ=long`` draws many more random cases. The counts per
node and outcome are printed at the end of the module.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import torch

from test_image_capture import TEST_NODES as IMAGE_TEST_NODES, tiny_vae
from test_nodes_graph import SITE, TEST_NODES, comfy, latent_sha, sampling_graph, shard_rows  # noqa: F401 (comfy)

LONG = os.environ.get("DIFFUSION_SAE_FUZZ", "") == "long"
RANDOM_CASES = 200 if LONG else 4
"""Random cases per node, on top of its table."""
SEED = 20240611
HANG_S = 60
"""A case still running after this long counts as a hang (the slowest case here takes a few seconds)."""
PROJECT_ERROR = re.compile(r"diffusion_sae\.[A-Za-z]+Error")
VALIDATION_ERRORS = {"value_not_in_list", "invalid_input_type", "value_smaller_than_min", "value_bigger_than_max",
                     "custom_validation_failed", "return_type_mismatch", "bad_linked_input",
                     "required_input_missing"}
"""What ComfyUI's validator reports for a value it refuses (anything else, e.g. an exception in our
validate_inputs, is a failure)."""
UNET_SITE = "middle_block:residual"
N_IMAGES = 2
LATENTS = 32
"""Latents of the fuzz dictionary (width 64: the tiny Flux's)."""
SIGMA_BAND = (0.5, 2.0)
"""The tiny Flux's one sampling step runs at a noise level between these (about 1): a sigma_min below the band
lets the steer act, one above it keeps it out."""
TOKENS = 16
"""Image tokens of the tiny Flux's 8x8 latent."""
PROBE_FOLDER = "fuzz_probe"
"""A class-per-subfolder folder in ComfyUI's input folder: classes a and b of PROBE_IMAGES 32x32 images each."""
PROBE_IMAGES = 3
ORGANISM_DICTIONARY = "organism_flux_db1_image.safetensors"
"""The plugin's shipped dictionary of the Flux organism, with its feature index beside it."""

NAN, INF = math.nan, math.inf
FLOATS = [NAN, INF, -INF, -1.0, 1e308, "abc", None, [], {"__value__": "x"}]
INTS = [-1, 0, 2**64, -(2**63), "abc", None, NAN, 10**30]
STRINGS = ["", " ", "\x00", "a" * 5000, "\u00e9\U0001F600", "\n", 5]
PATHS = ["", "..", "../..", "/etc", "~", "~/x", "a/../../b", "x\x00y", "C:\\x", "/", ".", "a" * 300, "a/" * 2000]
COMBOS = [5, "", "nope", None, "../x", " add", "ADD"]
SITES = ["", ":", "double_blocks.0", ":image", "double_blocks.-1:image", "double_blocks.99999999999999999999:image",
         "double_blocks.0:image:image", "x" * 5000, "\x00", None]
FEATURES = ["", " ", ",", "-1", str(LATENTS), "99999999999999999999", "1.5", "0x10", "3,3", "1e3", "9" * 5000, "\u0663",
            ",".join(map(str, range(LATENTS))), None, "3; 4", "nan"]
RAW = ["x", 5, {"samples": 1}]
"""Plain values a script may send for an input that takes another node's output (MODEL, DICTIONARY, ...)."""
COERCED = [True, False, "7", 1.5, "1e400", -1e-9, 2.0, 7, None, "false", "/tmp", "\\\\server\\share", "a/./../b"]
"""Values ComfyUI's validator turns into another type (``bool("false")`` is True, ``str(None)`` is "None", ...) or
that are valid for some inputs: in the random draws only, so that few table cases sample."""
ALPHABET = "ab09./\\~:, -_\x00\u00e9"


@dataclass(frozen=True)
class Link:
    """A value that is another node's output: ``node`` is added to the graph as node "30"."""

    node: dict
    slot: int = 0

    def __repr__(self) -> str:
        return f"Link({self.node['class_type']}{self.node['inputs']}, {self.slot})"


def odd(kind: str, slot: int, after_sampling: bool = False) -> Link:
    """An odd tensor (see ODD_TENSORS) as an IMAGE (slot 0), MASK (1) or LATENT (2), made after the sampler
    (node 3) when ``after_sampling``."""
    inputs = {"kind": kind, "after": ["3", 0]} if after_sampling else {"kind": kind}
    return Link({"class_type": "SAETestOddTensor", "inputs": inputs}, slot)


ODD_TENSORS: dict[str, Callable[[], torch.Tensor]] = {
    "empty_2d": lambda: torch.zeros(0, 0),
    "empty_batch": lambda: torch.zeros(0, 64, 64),
    "empty_image": lambda: torch.zeros(0, 64, 64, 3),
    "zero_width_image": lambda: torch.zeros(1, 64, 0, 3),
    "rank_1": lambda: torch.ones(64),
    "rank_5": lambda: torch.ones(1, 1, 8, 8, 3),
    "all_zero_mask": lambda: torch.zeros(64, 64),
    "ones_mask": lambda: torch.ones(1, 64, 64),
    "nan_mask": lambda: torch.full((64, 64), NAN),
    "negative_mask": lambda: -torch.ones(64, 64),
    "int_mask": lambda: torch.ones(64, 64, dtype=torch.int64),
    "rgb_image": lambda: torch.rand(N_IMAGES, 64, 64, 3, generator=torch.Generator().manual_seed(1)),
    "rgba_image": lambda: torch.rand(N_IMAGES, 64, 64, 4, generator=torch.Generator().manual_seed(1)),
    "gray_image": lambda: torch.rand(N_IMAGES, 64, 64, 1),
    "channels_first": lambda: torch.rand(N_IMAGES, 3, 64, 64),
    "uint8_image": lambda: torch.full((N_IMAGES, 64, 64, 3), 200, dtype=torch.uint8),
    "nan_image": lambda: torch.full((N_IMAGES, 64, 64, 3), NAN),
    "tiny_image": lambda: torch.rand(N_IMAGES, 4, 4, 3),
    "latent": lambda: torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)),
    "wide_latent": lambda: torch.randn(1, 16, 16, 16),
    "video_latent": lambda: torch.randn(1, 4, 2, 16, 16),
}


# ----------------------------------------------------------------------------- test-only nodes


class SAETestOddTensor:
    """One of ODD_TENSORS as IMAGE, MASK and LATENT; ``after`` orders it after the sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": ("STRING", {"default": "rgb_image"})}, "optional": {"after": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE", "MASK", "LATENT")
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    def make(self, kind, after=None):
        tensor = ODD_TENSORS[kind]()
        return (tensor, tensor, {"samples": tensor})


class SAETestWideVAE:
    """A tiny VAE whose latents have 16 channels (a Flux-style VAE), wrong for the tiny SD1.5 U-Net."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"channels": ("INT", {"default": 16, "min": 1, "max": 64})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, channels):
        return (tiny_vae(0, latent_channels=channels),)


KEPT: dict[str, Any] = {}


class SAETestKeep:
    """Keeps whatever it is given under ``label``, for the test to read."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"label": ("STRING", {})},
                "optional": {"image": ("IMAGE",), "reference": ("IMAGE",), "conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def keep(self, label, **given):
        KEPT[label] = given
        return {}


FUZZ_NODES = {cls.__name__: cls for cls in (SAETestOddTensor, SAETestWideVAE, SAETestKeep)}


# ----------------------------------------------------------------------------- cases and outcomes


class CaseHung(BaseException):
    """Raised in a case that ran past HANG_S (a BaseException: ComfyUI's executor catches Exception)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def hung(signum, frame):
        raise CaseHung()

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    kind: str
    """refused | project error | ran | other | hang | wrong result"""
    detail: str = ""
    history: Optional[dict] = None


def validation_outcome(details: dict) -> Outcome:
    """A refused prompt: fine when every error is one the validator gives for a refused value."""
    errors = [e for entry in details["node_errors"].values() for e in entry["errors"]]
    if not errors:
        return Outcome("other", f"refused without node errors: {details['error']}")
    for error in errors:
        exception = error.get("extra_info", {}).get("exception_type", "")
        if error["type"] not in VALIDATION_ERRORS or (exception and not PROJECT_ERROR.fullmatch(exception)):
            return Outcome("other", f"validation: {error}")
        if "\n" in str(error.get("details", "")).strip():
            return Outcome("other", f"multi-line validation message: {error['details']!r}")
    return Outcome("refused", "; ".join(f"{e['type']}: {e['details']}" for e in errors)[:200])


def execution_outcome(details: dict) -> Outcome:
    """A failed run: fine when the error is ours and its message one line."""
    kind, message = details.get("exception_type", ""), str(details.get("exception_message", ""))
    if not PROJECT_ERROR.fullmatch(kind):
        return Outcome("other", f"{details.get('node_type')}: {kind}: {message[:300]}")
    if not message.strip() or "\n" in message.strip():
        return Outcome("other", f"{kind} with a message that is not one line: {message!r}")
    return Outcome("project error", f"{details.get('node_type')}: {kind}: {message[:200]}")


def run_case(comfy, graph: dict) -> Outcome:
    """Queue ``graph`` as ComfyUI does: validate it (a refused output is dropped while the others run, so any
    node error counts as refused), then execute it."""
    import execution

    KEPT.clear()
    try:
        with time_limit(HANG_S):
            valid, error, _, node_errors = asyncio.run(execution.validate_prompt("fuzz", graph, None))
            if node_errors or not valid:
                return validation_outcome({"error": error, "node_errors": node_errors})
            history = comfy.execute_graph(graph)
    except CaseHung:
        return Outcome("hang", f"still running after {HANG_S} s")
    except comfy.GraphError as failure:
        return execution_outcome(failure.details)
    except Exception as failure:  # the validator or executor itself broke
        return Outcome("other", f"{type(failure).__name__}: {failure}")
    return Outcome("ran", history=history)


Check = Callable[[str, Any, dict], Optional[bool]]
"""``(input, value, history)`` of a case that ran -> whether the value asked for was used (None: not known)."""


@dataclass
class NodeFuzz:
    """A node under test: a working graph, the node's id in it, bad values per input, a check of runs."""

    name: str
    node_id: str
    graph: Callable[[], dict]
    values: dict[str, list]
    check: Check = lambda name, value, history: None
    draws: dict[str, Callable[[random.Random], Any]] = field(default_factory=dict)

    def cases(self, rng: random.Random) -> list[tuple[str, Any]]:
        table = [(name, value) for name, values in self.values.items() for value in values]
        drawn = []
        for _ in range(RANDOM_CASES):
            name = rng.choice(list(self.values))
            draw = self.draws.get(name)
            value = draw(rng) if draw and rng.random() < 0.5 else rng.choice(self.values[name] + COERCED)
            drawn.append((name, value))
        return table + drawn

    def mutated(self, name: str, value: Any) -> dict:
        graph = self.graph()
        if isinstance(value, Link):
            graph["30"] = json.loads(json.dumps(value.node))
            value = ["30", value.slot]
        graph[self.node_id]["inputs"][name] = value
        return graph


def random_float(rng: random.Random) -> float:
    return rng.choice([rng.uniform(-2.0, 2.0), rng.choice([-1, 1]) * 10 ** rng.uniform(-12, 308), NAN, INF])


def random_int(rng: random.Random) -> int:
    return rng.choice([rng.randint(-5, 300), 2 ** rng.randint(0, 70), -(2 ** rng.randint(0, 70))])


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))


def random_features(rng: random.Random) -> str:
    return rng.choice([", ", ",", " "]).join(str(rng.randint(-3, LATENTS + 3)) for _ in range(rng.randint(0, 4)))


# ----------------------------------------------------------------------------- fixtures


OUTCOMES: Counter = Counter()
PLAIN_SHA: dict[str, str] = {}
"""The unsteered one-step sample's sha256 of the tiny Flux ("flux") and of the Flux organism ("organism"), set by
the fuzz fixture."""
_names = count()


def fresh(prefix: str) -> str:
    return f"{prefix}_{next(_names)}"


def output_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()).resolve()


@pytest.fixture(scope="module")
def fuzz(comfy, one_thread, request):  # noqa: F811
    """ComfyUI with our plugin, the test nodes, a width-64 dictionary in models/sae, a shards folder and the
    probe's class folders in input/; prints the counts per node and outcome when the module ends."""
    import folder_paths
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update({**TEST_NODES, **IMAGE_TEST_NODES, **FUZZ_NODES})
    core = sys.modules[comfy.plugin_module().__name__ + ".sae_core"]
    acts = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    config = core.TrainConfig(core.DictionaryConfig(kind="topk", k=4, n_latents=LATENTS), total_steps=5,
                              batch_size=128, warmup_steps=1)
    core.save_dictionary(core.train_dictionary(acts, config).dictionary, comfy.sae_dir / "fuzz64.safetensors")
    comfy.execute_graph(capture_graph("sae_activations/fuzz_shards"))
    PLAIN_SHA.update(flux=latent_sha(comfy.execute_graph(one_step_sampling())),
                     organism=latent_sha(comfy.execute_graph(organism_sampling(("1", 0)))))
    write_probe_folders(Path(folder_paths.get_input_directory()))
    with pytest.MonkeyPatch.context() as patch:
        import huggingface_hub.constants

        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a Hub id fails at once, offline
        yield comfy
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(summary_lines()))


def summary_lines() -> list[str]:
    kinds = ["refused", "project error", "ran", "other", "hang", "wrong result"]
    lines = [f"node fuzz (seed {SEED}, {RANDOM_CASES} random cases per node): " + ", ".join(kinds)]
    for node in sorted({node for node, _ in OUTCOMES}):
        counts = [OUTCOMES[node, kind] for kind in kinds]
        tally = ", ".join(f"{kind} {n}" for kind, n in zip(kinds, counts))
        lines.append(f"  {node:<28} {sum(counts):4d} cases: {tally}")
    return lines


# ----------------------------------------------------------------------------- working graphs


def one_step_sampling(model_link: tuple[str, int] = ("1", 0)) -> dict:
    """The tiny Flux sampled for one step (node 3), its latent kept (node 4): the cheapest run that uses a site."""
    graph = sampling_graph(model_link=model_link)
    graph["3"]["inputs"]["steps"] = 1
    return graph


def steer_graph() -> dict:
    graph = one_step_sampling(("20", 0))
    graph["10"] = {"class_type": "SAELoadDictionary", "inputs": {"dictionary": "fuzz64.safetensors", "hub_id": ""}}
    graph["20"] = {"class_type": "SAESteer", "inputs": {
        "model": ["1", 0], "dictionary": ["10", 0], "site": SITE, "mode": "add", "features": "3", "strength": 1.0,
        "units": "token_norm", "window_start": 0.0, "window_end": 1.0, "cond_only": True}}
    return graph


def capture_graph(folder: Optional[str] = None) -> dict:
    graph = one_step_sampling(("20", 0))
    graph["20"] = {"class_type": "SAECaptureActivations", "inputs": {
        "model": ["1", 0], "site": SITE, "window_start": 0.0, "window_end": 1.0, "token_fraction": 1.0,
        "cond_only": True, "folder": folder or fresh("sae_activations/fuzz_capture"), "dtype": "float32"}}
    return graph


def train_graph() -> dict:
    return {"20": {"class_type": "SAETrainDictionary", "inputs": {
        "kind": "topk", "k": 4, "expansion": 2, "steps": 2, "lr": 0.001, "batch_size": 16,
        "name": fresh("fuzz_train"), "shards_folder": "sae_activations/fuzz_shards"}}}


def load_graph() -> dict:
    return {"20": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": "fuzz64.safetensors", "hub_id": ""}},
            "21": {"class_type": "PreviewAny", "inputs": {"source": ["20", 1]}}}


def image_capture_graph() -> dict:
    return {
        "1": {"class_type": "SAETestTinySD15", "inputs": {"seed": 0}},
        "2": {"class_type": "SAETestTinyVAE", "inputs": {"seed": 0}},
        "3": {"class_type": "SAETestImagesAndEmptyPrompt", "inputs": {"batch": N_IMAGES}},
        "20": {"class_type": "SAECaptureFromImages", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "images": ["3", 0], "positive": ["3", 1], "site": UNET_SITE,
            "sigma": 0.155, "pool": "mean", "folder": fresh("sae_activations/fuzz_images"), "seed": 0}},
    }


def recorded_graph() -> dict:
    """Tiny Flux -> Record Features (node 11, last step) -> KSampler; the sample as an IMAGE (node 12)."""
    graph = one_step_sampling(("11", 0))
    graph["10"] = {"class_type": "SAELoadDictionary", "inputs": {"dictionary": "fuzz64.safetensors", "hub_id": ""}}
    graph["11"] = {"class_type": "SAERecordFeatures", "inputs": {
        "model": ["1", 0], "dictionary": ["10", 0], "site": SITE, "window_start": 0.0, "window_end": 1.0}}
    graph["12"] = {"class_type": "SAETestLatentToImage", "inputs": {"samples": ["3", 0]}}
    return graph


def record_graph() -> dict:
    graph = recorded_graph()
    graph["20"] = graph.pop("11")
    graph["3"]["inputs"]["model"] = ["20", 0]
    graph["21"] = {"class_type": "SAETestKeepRecording", "inputs": {"recording": ["20", 1], "samples": ["3", 0],
                                                                   "label": "fuzz"}}
    return graph


def heatmap_graph() -> dict:
    graph = recorded_graph()
    graph["20"] = {"class_type": "SAEFeatureHeatmap", "inputs": {"image": ["12", 0], "recording": ["11", 1],
                                                                "feature": 0, "opacity": 0.6}}
    graph["21"] = {"class_type": "SAETestKeep", "inputs": {"label": "heatmap", "image": ["20", 0],
                                                          "reference": ["12", 0]}}
    return graph


def top_features_graph() -> dict:
    graph = recorded_graph()
    graph["20"] = {"class_type": "SAETopFeatures", "inputs": {"image": ["12", 0], "recording": ["11", 1], "n": 10}}
    return graph


def organism_load_graph() -> dict:
    return {"20": {"class_type": "SAELoadModelOrganism", "inputs": {"family": "flux", "folder": ""}},
            "21": {"class_type": "SAEOrganismTextEncode", "inputs": {"model": ["20", 0], "prompt": "a seven"}},
            "22": {"class_type": "SAETestKeep", "inputs": {"label": "organism", "conditioning": ["21", 0]}}}


def organism_encode_graph() -> dict:
    return {"21": {"class_type": "SAELoadModelOrganism", "inputs": {"family": "flux", "folder": ""}},
            "20": {"class_type": "SAEOrganismTextEncode", "inputs": {"model": ["21", 0], "prompt": "a seven"}},
            "22": {"class_type": "SAETestKeep", "inputs": {"label": "organism", "conditioning": ["20", 0]}}}


def organism_latent_graph() -> dict:
    return {"20": {"class_type": "SAEEmptyOrganismLatent", "inputs": {"batch_size": 1}},
            "21": {"class_type": "SAEOrganismDecode", "inputs": {"samples": ["20", 0], "upscale": 1}},
            "22": {"class_type": "SAETestKeep", "inputs": {"label": "decoded", "image": ["21", 0]}}}


def organism_decode_graph() -> dict:
    return {"21": {"class_type": "SAEEmptyOrganismLatent", "inputs": {"batch_size": 1}},
            "20": {"class_type": "SAEOrganismDecode", "inputs": {"samples": ["21", 0], "upscale": 1}},
            "22": {"class_type": "SAETestKeep", "inputs": {"label": "decoded", "image": ["20", 0]}}}


def write_probe_folders(root: Path) -> None:
    """PROBE_FOLDER in ComfyUI's input folder, and beside it folders that are wrong or odd in one way each: one
    class, images smaller than a latent, images of every PIL mode and size, a file that is not an image."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)

    def picture(size: tuple[int, int] = (32, 32)) -> Image.Image:
        return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())

    def save(folder: str, pictures: dict[str, list[Image.Image]], suffix: str = ".png") -> None:
        for name, images in pictures.items():
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(root / folder / name / f"{i}{suffix}")

    save(PROBE_FOLDER, {name: [picture() for _ in range(PROBE_IMAGES)] for name in "ab"})
    save("fuzz_probe_one", {"a": [picture(), picture()]})
    save("fuzz_probe_tiny", {name: [picture((4, 4)), picture((4, 4))] for name in "ab"})
    save("fuzz_probe_modes", {"a": [picture().convert(mode) for mode in ("L", "1", "P", "RGBA", "I;16")],
                              "b": [picture((80, 48)), picture().convert("LA"), picture()]})
    save("fuzz_probe_jpeg", {name: [picture().convert("CMYK"), picture()] for name in "ab"}, ".jpg")
    save("fuzz_probe_broken", {name: [picture(), picture()] for name in "ab"})
    (root / "fuzz_probe_broken" / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def organism_sampling(model_link: tuple[str, int]) -> dict:
    """The Flux organism (node 1) sampled for one step from a prompt by KSampler (node 3), its latent kept (node 4);
    the organism's empty latent is node 7."""
    return {
        "1": {"class_type": "SAELoadModelOrganism", "inputs": {"family": "flux", "folder": ""}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a handwritten one"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "7": {"class_type": "SAEEmptyOrganismLatent", "inputs": {"batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": list(model_link), "seed": 0, "steps": 1, "cfg": 2.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
            "denoise": 1.0}},
        "4": {"class_type": "SAETestKeepLatent", "inputs": {"samples": ["3", 0]}},
    }


def concept_graph() -> dict:
    """Steer by Concept (node 20) measuring a seven against the empty prompt in one step each, then sampling."""
    graph = organism_sampling(("20", 0))
    graph["20"] = {"class_type": "SAESteerByConcept", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "dictionary": ORGANISM_DICTIONARY, "site": "", "source": "prompts",
        "positive": "a handwritten seven", "negative": "", "top_n": 4, "strength": 1.0, "mode": "add",
        "window_start": 0.0, "window_end": 1.0, "cond_only": True, "latent": ["7", 0], "seed": 0, "steps": 1,
        "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple"}}
    return graph


def sweep_graph() -> dict:
    """Steer Sweep (node 20) on the tiny Flux: strengths 0 and 1 of one feature, one window; both outputs kept."""
    return {
        "1": {"class_type": "SAETestTinyFlux", "inputs": {"seed": 0}},
        "2": {"class_type": "SAETestTinyInputs", "inputs": {"seed": 1, "batch": 1}},
        "5": {"class_type": "SAETestTinyVAE", "inputs": {"seed": 0}},
        "10": {"class_type": "SAELoadDictionary", "inputs": {"dictionary": "fuzz64.safetensors", "hub_id": ""}},
        "20": {"class_type": "SAESteerSweep", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent": ["2", 2], "vae": ["5", 0],
            "seed": 0, "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "site": SITE,
            "features": "3", "mode": "add", "units": "token_norm", "strengths": "0, 1", "windows": "0-1",
            "cond_only": True, "dictionary": ["10", 0]}},
        "21": {"class_type": "SAETestKeep", "inputs": {"label": "sweep", "image": ["20", 1], "reference": ["20", 0]}},
    }


def probe_graph() -> dict:
    """Diff-C Probe (node 20) of PROBE_FOLDER on the tiny U-Net and VAE, one site at one level."""
    return {
        "1": {"class_type": "SAETestTinySD15", "inputs": {"seed": 0}},
        "2": {"class_type": "SAETestTinyVAE", "inputs": {"seed": 0}},
        "20": {"class_type": "SAEDiffCProbe", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "folder": PROBE_FOLDER, "sites": UNET_SITE, "levels": "0.5",
            "test_fraction": 0.5, "seed": 0, "batch_size": 4}},
    }


# ----------------------------------------------------------------------------- checks of runs


def steer_check(name: str, value: Any, history: dict) -> Optional[bool]:
    """The sample changes exactly when the steer can change it: a non-zero strength, at a noise level reached."""
    changed = latent_sha(history) != PLAIN_SHA["flux"]
    if name == "strength":
        return changed == (float(value) != 0.0)
    if name == "sigma_min":
        low = float(value)
        return None if SIGMA_BAND[0] < low < SIGMA_BAND[1] else changed == (low <= SIGMA_BAND[0])
    if name in ("features", "site") or (name == "mask" and isinstance(value, Link)):
        return changed
    return None


def capture_check(name: str, value: Any, history: dict) -> Optional[bool]:
    """The vectors land in the folder named, inside output/."""
    if name != "folder":
        return None
    folder = (output_dir() / str(value).strip()).resolve()
    vectors = shard_rows(folder)["activations"].shape[0] if output_dir() in folder.parents else 0
    return vectors > 0 and vectors % TOKENS == 0  # a folder named twice holds two runs


def train_check(name: str, value: Any, history: dict) -> Optional[bool]:
    """The dictionary is saved under the name asked for, with the k asked for."""
    summary = history["outputs"]["20"]["text"][0]
    saved = re.search(r"saved as (\S+)\.safetensors", summary)
    if saved is None:
        return False
    if name == "name":
        return saved.group(1) == str(value)
    if name == "k":
        return f"k={int(value)}," in summary
    return True


def load_check(name: str, value: Any, history: dict) -> Optional[bool]:
    return "d_in=64" in history["outputs"]["21"]["text"][0]


def image_capture_check(name: str, value: Any, history: dict) -> Optional[bool]:
    """All images captured, at the sigma asked for, into the folder named."""
    summary = history["outputs"]["20"]["text"][0]
    if f"captured {N_IMAGES} image(s)" not in summary:
        return False
    if name == "sigma":
        return f"sigma={float(value):g}," in summary
    if name == "folder":
        folder = (output_dir() / str(value).strip()).resolve()
        return output_dir() in folder.parents and (folder / "manifest.json").is_file()
    return True


def heatmap_check(name: str, value: Any, history: dict) -> Optional[bool]:
    """The heatmap is the picture's size, in RGB; an opacity of 0 leaves the picture as it was."""
    kept = KEPT["heatmap"]
    picture = ODD_TENSORS[value.node["inputs"]["kind"]]() if name == "image" else kept["reference"]
    heatmap = kept["image"]
    if tuple(heatmap.shape) != (*picture.shape[:3], 3) or not torch.isfinite(heatmap).all():
        return False
    if name == "opacity" and float(value) == 0.0:
        return torch.equal(heatmap, picture[..., :3])
    return True


def top_features_check(name: str, value: Any, history: dict) -> Optional[bool]:
    lines = history["outputs"]["20"]["text"][0].splitlines()
    return len(lines) == min(int(value), LATENTS) if name == "n" else True


def organism_latent_check(name: str, value: Any, history: dict) -> Optional[bool]:
    """The decoded batch has the size asked for (batch_size) and the enlargement asked for (upscale)."""
    image = KEPT["decoded"]["image"]
    if name == "batch_size":
        return tuple(image.shape) == (int(value), 32, 32, 3)
    if name == "upscale":
        return tuple(image.shape) == (1, 32 * int(value), 32 * int(value), 3)
    return None


def concept_check(name: str, value: Any, history: dict) -> Optional[bool]:
    """The concept keeps the number of features asked for and the strength asked for, and the steered clone
    changes the sample exactly when that strength is not 0 (a strength too small to move a float is not judged)."""
    text = history["outputs"]["20"]["text"][0]
    kept = len(re.findall(r"^  #\d+ ", text, re.MULTILINE))
    if name == "top_n":
        return kept == int(value) if int(value) <= 8 else 0 < kept <= int(value)
    if name == "strength":
        strength = float(value)
        if f"strength {strength:g}" not in text.splitlines()[0]:
            return False
        changed = latent_sha(history) != PLAIN_SHA["organism"]
        return None if 0 < abs(strength) < 1e-3 else changed == (strength != 0.0)
    return kept > 0


def listed(value: Any) -> list[str]:
    return [part for part in str(value).split(",") if part.strip()]


def sweep_check(name: str, value: Any, history: dict) -> Optional[bool]:
    """One picture per strength and window asked for, laid out in one grid picture, finite unless a strength
    asked for overflows; the steered cell differs from the zero-strength one when features are steered."""
    images, grid = KEPT["sweep"]["image"], KEPT["sweep"]["reference"]
    if grid.ndim != 4 or grid.shape[0] != 1 or grid.shape[-1] != 3:
        return False
    if name != "strengths" and not (torch.isfinite(images).all() and torch.isfinite(grid).all()):
        return False
    if name == "latent":
        return None  # another batch size
    columns = len(listed(value)) if name == "strengths" else 2
    rows = len(listed(value)) if name == "windows" else 1
    if images.shape[0] != rows * columns:
        return False
    return not torch.equal(images[0], images[1]) if name == "features" else True


def probe_check(name: str, value: Any, history: dict) -> Optional[bool]:
    """The table names the folder asked for, has a row per site and a column per level asked for, splits each
    class's images by the test fraction asked for, and holds accuracies in [0, 1]."""
    text = history["outputs"]["20"]["text"][0]
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| site |"))
    levels = [cell.strip() for cell in header.strip("| ").split("|")[1:]]
    rows = {cells[0]: [float(c.strip("*")) for c in cells[1:]]
            for cells in ([c.strip() for c in line.strip().strip("|").split("|")] for line in lines
                          if line.startswith("| ") and line is not header)}
    if not rows or not all(0.0 <= v <= 1.0 for row in rows.values() for v in row):
        return False
    if name == "folder":
        return text.startswith(f"Diff-C probe of input/{str(value).strip()}: ")
    if name == "levels":
        asked = {float(p) for p in re.split(r"[,\s]+", str(value).strip()) if p}
        return levels == [f"{level:g}" for level in sorted(asked)]
    if name == "sites":
        names = [part.strip() for part in str(value).split(",") if part.strip()]
        return len(rows) > 1 if [n.lower() for n in names] == ["all"] else list(rows) == list(dict.fromkeys(names))
    if name == "test_fraction":
        per_class = min(max(round(float(value) * PROBE_IMAGES), 1), PROBE_IMAGES - 1)
        test, images = 2 * per_class, 2 * PROBE_IMAGES
        return f"{images - test} train / {test} test images." in text
    return text.startswith(f"Diff-C probe of input/{PROBE_FOLDER}: {2 * PROBE_IMAGES} images of 2 classes (a, b)")


def random_numbers(rng: random.Random) -> str:
    return rng.choice([", ", ",", " "]).join(f"{random_float(rng):g}" for _ in range(rng.randint(0, 3)))


def random_windows(rng: random.Random) -> str:
    return ", ".join(f"{rng.uniform(-0.2, 1.2):.2f}-{rng.uniform(-0.2, 1.2):.2f}" for _ in range(rng.randint(0, 3)))


ORGANISM_FLUX = {"class_type": "SAETestTinyFlux", "inputs": {"seed": 0}}
NODES = [
    NodeFuzz("SAELoadDictionary", "20", load_graph, {
        "dictionary": ["../fuzz64.safetensors", "/etc/passwd", "(none)", "fuzz64", *COMBOS],
        "hub_id": ["~", "/etc", "..", "../../..", "hf://../../x", "C:\\x", "./fuzz64.safetensors", "a/../b", "~/x",
                   "owner/name", "hf://owner/name/sub@main", "\x00", " / ", 5]},
        load_check, {"hub_id": random_text}),
    NodeFuzz("SAETrainDictionary", "20", train_graph, {
        "shards_folder": [*PATHS, "sae_activations/./fuzz_shards", "sae_activations/missing",
                          "sae_activations/fuzz_shards/manifest.json"],
        "name": [*STRINGS, "a/b", ".", ".hidden", "a" * 250], "kind": COMBOS, "k": [*INTS, 2**40],
        "expansion": [*INTS, 2**40, 2**63], "lr": FLOATS, "batch_size": INTS,
        "steps": [0, -1, 2**64, "abc", None, NAN],  # no huge valid step count: it would train for that long
        "capture": RAW},
        train_check, {"shards_folder": random_text, "name": random_text, "k": random_int, "lr": random_float}),
    NodeFuzz("SAECaptureActivations", "20", capture_graph, {
        "site": SITES, "window_start": FLOATS, "window_end": FLOATS, "token_fraction": FLOATS,
        "folder": [*PATHS, "sae_activations/x/../fuzz_dots"], "dtype": COMBOS, "destination": COMBOS,
        "max_vectors": INTS, "cond_only": ["false"], "model": RAW},
        capture_check, {"folder": random_text, "window_start": random_float, "token_fraction": random_float}),
    NodeFuzz("SAECaptureFromImages", "20", image_capture_graph, {
        "images": [odd(kind, 0) for kind in ("empty_image", "zero_width_image", "rank_1", "rank_5", "gray_image",
                                             "channels_first", "uint8_image", "nan_image", "tiny_image", "rgba_image",
                                             "latent")],
        "vae": [Link({"class_type": "SAETestWideVAE", "inputs": {"channels": 16}})],
        "positive": [Link({"class_type": "SAETestTinyInputs", "inputs": {"seed": 1, "batch": 1}})],
        "sigma": FLOATS, "pool": COMBOS, "folder": PATHS, "seed": INTS, "site": SITES, "model": RAW},
        image_capture_check, {"sigma": random_float, "folder": random_text, "seed": random_int}),
    NodeFuzz("SAESteer", "20", steer_graph, {
        "features": FEATURES, "strength": [*FLOATS, 0.0], "window_start": FLOATS, "window_end": FLOATS,
        "sigma_min": [*FLOATS, 50.0], "sigma_max": FLOATS, "mode": COMBOS, "units": COMBOS, "site": SITES,
        "mask": [odd(kind, 1) for kind in ("empty_2d", "empty_batch", "rank_1", "rank_5", "all_zero_mask",
                                           "ones_mask", "int_mask", "nan_mask", "negative_mask", "rgb_image")],
        "cond_only": [], "subtract_uncond": [], "model": RAW, "dictionary": RAW},
        steer_check, {"features": random_features, "strength": random_float, "sigma_min": random_float}),
    NodeFuzz("SAERecordFeatures", "20", record_graph, {
        "site": SITES, "window_start": FLOATS, "window_end": FLOATS, "model": RAW, "dictionary": RAW},
        draws={"window_start": random_float, "window_end": random_float}),
    NodeFuzz("SAEFeatureHeatmap", "20", heatmap_graph, {
        "feature": [*INTS, LATENTS, LATENTS - 1], "opacity": [*FLOATS, 0.0, 1.0],
        "image": [odd(kind, 0, after_sampling=True) for kind in ("empty_image", "gray_image", "uint8_image",
                                                                 "rgba_image")],
        "recording": RAW},
        heatmap_check, {"feature": random_int, "opacity": random_float}),
    NodeFuzz("SAETopFeatures", "20", top_features_graph, {"n": [*INTS, 256, 257], "recording": RAW}, top_features_check,
             {"n": random_int}),
    NodeFuzz("SAELoadModelOrganism", "20", organism_load_graph, {
        "family": COMBOS, "folder": [*(p for p in PATHS if p not in ("", ".")), " "]}),
    NodeFuzz("SAEOrganismTextEncode", "20", organism_encode_graph, {
        "prompt": ["", "a" * 5000], "model": [Link(ORGANISM_FLUX)]}, draws={"prompt": random_text}),
    NodeFuzz("SAEEmptyOrganismLatent", "20", organism_latent_graph, {"batch_size": [*INTS, 4096, 4097]},
             organism_latent_check, {"batch_size": random_int}),
    NodeFuzz("SAEOrganismDecode", "20", organism_decode_graph, {
        "upscale": [*INTS, 32, 33],
        "samples": [odd(kind, 2) for kind in ("latent", "wide_latent", "video_latent", "empty_2d", "rgb_image",
                                              "nan_image")]},
        organism_latent_check, {"upscale": random_int}),
    NodeFuzz("SAESteerByConcept", "20", concept_graph, {
        "dictionary": [*COMBOS, f"../{ORGANISM_DICTIONARY}", "fuzz64.safetensors"],
        "site": [*SITES, "double_blocks.0:image", " double_blocks.1:image "], "source": COMBOS,
        "positive": ["", " \n ", "a" * 5000, "\x00", 5, "seven"],
        "negative": ["\n\n", "a" * 5000, "a handwritten seven", 5],
        "top_n": [*INTS, 1, 4096, 4097], "strength": [*FLOATS, 0.0, 100.0, 101.0], "mode": COMBOS,
        "window_start": FLOATS, "window_end": FLOATS,
        "latent": [odd(kind, 2) for kind in ("empty_2d", "latent", "wide_latent", "video_latent", "rgb_image")],
        "seed": INTS, "steps": [0, -1, 2**64, "abc", None, NAN, 1001], "cfg": FLOATS, "sampler_name": COMBOS,
        "scheduler": COMBOS,
        "mask": [odd(kind, 1) for kind in ("empty_2d", "rank_1", "all_zero_mask", "nan_mask", "ones_mask")],
        "clip": [*RAW, Link(ORGANISM_FLUX)], "model": [*RAW, Link(ORGANISM_FLUX)], "cond_only": ["false"]},
        concept_check, {"top_n": random_int, "strength": random_float, "positive": random_text}),
    NodeFuzz("SAESteerSweep", "20", sweep_graph, {
        "features": FEATURES,
        "strengths": ["", " , ", "nan", "inf", "1e400", "abc", "0x1", ", ".join(["0"] * 65), "0, 1e30", "-1e-300",
                      None, 5],
        "windows": ["", ",", "0-1.5", "0.5-0.2", "a-b", "-0.5-1", "1-1", ".5-.7", " 0 - 1 ", "0-1,0-1,0-1",
                    "0-1;0-0.5", "nan-1", None, 5],
        "mode": COMBOS, "units": COMBOS, "site": SITES, "sampler_name": COMBOS, "scheduler": COMBOS, "seed": INTS,
        "steps": [0, -1, 2**64, "abc", None, NAN], "cfg": FLOATS,
        "latent": [odd(kind, 2) for kind in ("empty_2d", "latent", "wide_latent", "video_latent")],
        "vae": [Link({"class_type": "SAETestWideVAE", "inputs": {"channels": 16}}), *RAW],
        "positive": [odd("rgb_image", 0), Link({"class_type": "SAETestImagesAndEmptyPrompt", "inputs": {"batch": 1}}, 1),
                     *RAW],
        "negative": RAW,
        "dictionary": [*RAW, Link({"class_type": "SAELoadDictionary",
                                   "inputs": {"dictionary": ORGANISM_DICTIONARY, "hub_id": ""}})],
        "concept": RAW, "model": RAW, "cond_only": []},
        sweep_check, {"features": random_features, "strengths": random_numbers, "windows": random_windows}),
    NodeFuzz("SAEDiffCProbe", "20", probe_graph, {
        "folder": [*PATHS, f"{PROBE_FOLDER}/a", f" {PROBE_FOLDER} ", "fuzz_probe_one", "fuzz_probe_tiny",
                   "fuzz_probe_modes", "fuzz_probe_jpeg", "fuzz_probe_broken", 5],
        "sites": [*SITES, " ALL ", f"{UNET_SITE},, {UNET_SITE}", "input_blocks.1:residual, middle_block:residual"],
        "levels": ["", " , ", "nan", "-0.1", "1.1", "0, 1", "1e-400", "inf", "0x1", "abc", "0.5" + ", .5" * 2000,
                   None, 5],
        "test_fraction": [*FLOATS, 0.05, 0.95, 0.0, 1.0], "seed": INTS, "batch_size": [*INTS, 4096, 4097],
        "positive": [Link({"class_type": "SAETestTinyInputs", "inputs": {"seed": 1, "batch": 1}}),
                     odd("rgb_image", 0)],
        "vae": [Link({"class_type": "SAETestWideVAE", "inputs": {"channels": 16}}), *RAW],
        "model": [*RAW, Link(ORGANISM_FLUX)]},
        probe_check, {"levels": random_numbers, "test_fraction": random_float, "folder": random_text}),
]


# ----------------------------------------------------------------------------- the fuzz


@pytest.mark.parametrize("node", NODES, ids=lambda node: node.name)
def test_every_bad_input_is_refused_or_fails_with_a_project_error_or_runs_as_asked(fuzz, node):
    rng = random.Random(f"{SEED}-{node.name}")
    bad = []
    for name, value in node.cases(rng):
        outcome = run_case(fuzz, node.mutated(name, value))
        if outcome.kind == "ran":
            verdict = node.check(name, value, outcome.history)
            if verdict is False:
                outcome = Outcome("wrong result", f"{name}={value!r:.80} ran but did not use the value")
        OUTCOMES[node.name, outcome.kind] += 1
        if outcome.kind in ("other", "hang", "wrong result"):
            bad.append(f"{name}={value!r:.80}: {outcome.kind}: {outcome.detail}")
    assert not bad, "\n".join(bad)
