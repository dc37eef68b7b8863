"""Load Dictionary and Train Dictionary: a dictionary from ``models/sae``, the Hub, or captured activations."""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Optional

import torch
from comfy_api.latest import io, ui

from ..sae_core import (ConfigError, InputError, ShardError, ShardReader, TrainConfig, load_dictionary,
                        save_dictionary, train_dictionary)
from ..sae_core.config import Option, options
from ..sae_core.plots import line_chart
from .capture_nodes import Capture
from .common import (CAPTURE, CATEGORY, DICTIONARY, MAX_NAME_BYTES, check_choices, describe, output_folder,
                     paths_named_from_output, pil_to_image, relative_to_output, require_choices, require_linked,
                     sae_files, sae_save_dir)

NONE = "(none)"
TRAINING_BYTES_PER_WEIGHT = 16
"""float32 weight, gradient and Adam's two moments: what training holds per encoder and decoder weight."""
SAVED_SUFFIX = ".safetensors"
CONFIG_INPUTS = {"kind": "kind", "k": "k", "expansion": "expansion_factor", "steps": "total_steps", "lr": "lr",
                 "batch_size": "batch_size"}
"""Train Dictionary's inputs that set a TrainConfig option: input name (as saved workflows have it) -> option."""
FLOAT_STEPS = {"lr": 1e-5}
"""The widget's increment for float options (ComfyUI rounds typed values to it)."""
NO_INT_LIMIT = 0xFFFFFFFFFFFFFFFF
"""ComfyUI's own "no upper limit" for INT inputs (its seed inputs use it); without one the widget stops at 2048."""
NO_FLOAT_LIMIT = sys.float_info.max


def config_input(name: str, option: Option) -> io.Input:
    """Node input ``name`` for a TrainConfig option: its choices or range, default and tooltip (its docstring).

    An option that may be unset shows 0 for "unset"; that needs 0 to be no value it can take otherwise."""
    if option.choices is not None:
        return io.Combo.Input(name, options=list(option.choices), default=option.default, tooltip=option.help)
    low, default = option.min, option.default
    if option.optional:
        if low is None or low < 0 or (low == 0 and not option.min_open):
            raise TypeError(f"{option.name} may be unset but may also be 0: a node input cannot tell the two apart")
        low, default = 0, 0 if default is None else default
    if option.type is int:
        return io.Int.Input(name, default=default, min=low, max=NO_INT_LIMIT if option.max is None else option.max,
                            tooltip=option.help)
    return io.Float.Input(name, default=default, min=low, max=NO_FLOAT_LIMIT if option.max is None else option.max,
                          step=FLOAT_STEPS[option.name], tooltip=option.help)


def config_inputs() -> list[io.Input]:
    """Train Dictionary's config inputs, generated from TrainConfig's options, in the saved workflows' order."""
    by_name = {option.name: option for option in options(TrainConfig)}
    return [config_input(name, by_name[option]) for name, option in CONFIG_INPUTS.items()]


def train_config(values: dict[str, Any], device: str) -> TrainConfig:
    """The TrainConfig the node's config inputs ``values`` (by input name) ask for; 0 means unset where allowed."""
    optional = {option.name for option in options(TrainConfig) if option.optional}
    chosen = {CONFIG_INPUTS[name]: value for name, value in values.items()}
    chosen = {name: None if name in optional and value == 0 else value for name, value in chosen.items()}
    steps = chosen["total_steps"]
    return TrainConfig.from_dict({**chosen, "log_every": max(1, steps // 100), "device": device})


def check_name(name: str) -> None:
    """A trained dictionary's file name: one plain name in models/sae, short enough for the file system."""
    if not re.fullmatch(r"\w[\w.-]*", name):
        raise InputError(f"dictionary name {name!r}: use letters, digits, '.', '-' and '_' only, starting with a "
                         "letter or digit")
    if len(f"{name}{SAVED_SUFFIX}".encode()) > MAX_NAME_BYTES:
        raise InputError(f"dictionary name {name[:20]!r}... is {len(name)} characters long: use a shorter name")


def check_fits_in_memory(config: TrainConfig, d_in: int) -> None:
    """Refuse, before allocating anything, an SAE too large to train on this device (a huge expansion, typed or
    sent by a script), rather than fail on an allocation deep inside training."""
    import comfy.model_management

    if config.dictionary.kind == "itda":  # grows up to max_atoms, which the node does not set
        return
    latents = config.dictionary.width(d_in)
    needed = TRAINING_BYTES_PER_WEIGHT * 2 * latents * d_in
    available = comfy.model_management.get_total_memory(torch.device(config.device))
    if needed > available:
        raise ConfigError(f"expansion {config.dictionary.expansion_factor} makes {latents} latents on {d_in}-wide "
                          f"activations, about {needed / 2**30:.3g} GiB to train, more than this device's "
                          f"{available / 2**30:.3g} GiB: lower expansion")


class SAELoadDictionary(io.ComfyNode):
    """A dictionary file from ``models/sae``, or a Hugging Face id (``owner/repo/subfolder``) when one is typed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAELoadDictionary",
            display_name="Load Dictionary",
            category=f"{CATEGORY}/dictionary",
            description=("Loads a sparse dictionary (SAE or ITDA) from models/sae or the Hugging Face Hub, for Steer, "
                         "Record Features and the other nodes; shows its kind, width and site."),
            inputs=[
                io.Combo.Input("dictionary", options=[NONE] + sae_files(),
                               tooltip="a file in models/sae (ours, or a SAELens / sparsify / SDLens / ITDA one)"),
                io.String.Input("hub_id", default="", optional=True,
                                tooltip="hf://owner/repo/subfolder on the Hugging Face Hub (an id, never a local "
                                        "path); overrides the file"),
            ],
            outputs=[DICTIONARY.Output(display_name="dictionary", tooltip="the loaded dictionary"),
                     io.String.Output(display_name="description", tooltip="kind, width, latents, k and site")],
        )

    @classmethod
    def validate_inputs(cls, dictionary: Optional[str] = None) -> bool | str:
        """A saved workflow's file that is not in models/sae is refused before it runs (see check_choices)."""
        if dictionary is None or dictionary == NONE or dictionary in sae_files():
            return True
        return not_listed(dictionary)

    @classmethod
    def execute(cls, dictionary: str, hub_id: str = "") -> io.NodeOutput:
        source = hub_id.strip()
        sae = load_dictionary(source, allow_local=False) if source else load_dictionary(sae_file_path(dictionary))
        description = describe(sae)
        return io.NodeOutput(sae, description, ui=ui.PreviewText(description))


def sae_file_path(dictionary: str) -> str:
    """The full path of ``dictionary``, one of the files listed in models/sae; InputError for any other name
    (a workflow can send anything, e.g. ``../x.safetensors``, past the list the editor shows)."""
    import folder_paths

    if dictionary == NONE:
        raise InputError("no dictionary chosen: pick a file from models/sae or type a Hub id")
    if dictionary not in sae_files():
        raise InputError(not_listed(dictionary))
    return folder_paths.get_full_path_or_raise("sae", dictionary)


def not_listed(dictionary: str) -> str:
    return f"dictionary file {dictionary!r} is not in models/sae: put it there, or pick one from the list"


def training_data(capture, shards_folder: str, batch_size: int):
    """``(data, site, batch)``: a memory capture's vectors, or a shuffling reader of a capture's or a folder's
    shards (``shards_folder``: a relative folder inside ComfyUI's output folder); the batch no larger than the
    data."""
    if capture is not None and capture.buffer is not None:
        data = capture.buffer.tensors()["activations"].float()
        if not len(data):
            raise ShardError("the memory capture is empty: connect the sampler's LATENT to 'after' so it runs first")
        return data, capture.site, min(batch_size, len(data))
    folder = capture.directory if capture is not None else output_folder(shards_folder, "shards_folder")
    if not folder.is_dir():
        raise ShardError(f"no activations in {relative_to_output(folder)!r} of ComfyUI's output folder: run Capture "
                         "Activations into it first, or check the shards_folder name")
    with paths_named_from_output():
        probe = ShardReader(folder, batch_size=1, shuffle=False)
        reader = ShardReader(folder, batch_size=min(batch_size, probe.n_tokens), shuffle=True)
    return reader, reader.site, reader.batch_size


class SAETrainDictionary(io.ComfyNode):
    """Train a TopK / BatchTopK SAE or grow an ITDA dictionary on captured activations.

    Connect the sampler's LATENT to ``after`` so training waits for the capture to finish."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAETrainDictionary",
            display_name="Train Dictionary",
            category=f"{CATEGORY}/dictionary",
            description=("Trains a TopK or BatchTopK sparse autoencoder, or grows an ITDA dictionary, on activations "
                         "captured by Capture Activations (connected, or a shards folder), saves it to models/sae and "
                         "plots its training loss. Hover an input for its meaning and default."),
            inputs=[
                *config_inputs(),
                io.String.Input("name", default="my_dictionary",
                                tooltip="file name in models/sae (letters, digits, '.', '-', '_')"),
                CAPTURE.Input("capture", optional=True,
                              tooltip="a Capture Activations node's capture (memory or shards)"),
                io.String.Input("shards_folder", default="", optional=True,
                                tooltip="a folder inside ComfyUI's output folder written by Capture Activations, "
                                        "e.g. sae_activations/run1"),
                io.Latent.Input("after", optional=True,
                                tooltip="the sampler's output, so that training runs after the capture"),
            ],
            outputs=[DICTIONARY.Output(display_name="dictionary", tooltip="the trained dictionary"),
                     io.Image.Output(display_name="loss_curve", tooltip="the training loss over the steps"),
                     io.String.Output(display_name="summary", tooltip="what was trained on, and the final loss")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, kind: Optional[str] = None) -> bool | str:
        return check_choices(cls, kind=kind)

    @classmethod
    def execute(cls, name: str, capture=None, shards_folder: str = "", after=None, **values) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        if capture is None and not shards_folder.strip():
            raise InputError("no activations to train on: connect a capture or give a shards folder")
        require_choices(cls, kind=values["kind"])
        if capture is not None:
            require_linked(capture, Capture, "capture", "Capture Activations")
        check_name(name)
        data, site, batch = training_data(capture, shards_folder, values["batch_size"])
        config = train_config({**values, "batch_size": batch}, str(comfy.model_management.get_torch_device()))
        check_fits_in_memory(config, int(data.shape[1]) if torch.is_tensor(data) else data.d)
        bar = comfy.utils.ProgressBar(config.total_steps)
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
            result = train_dictionary(data, config, site=site,
                                      progress=lambda step, total, metrics: bar.update_absolute(step, total))
        sae = result.dictionary.cpu()
        save_dictionary(sae, os.path.join(sae_save_dir(), f"{name}{SAVED_SUFFIX}"))
        loss = "relative_loss" if config.dictionary.kind == "itda" else "fvu"  # ITDA reports each input's relative error
        chart = pil_to_image(line_chart({loss: [(m["step"], m[loss]) for m in result.history]},
                                        f"{name}: training loss", y_label=loss))
        final = result.history[-1] if result.history else {}
        summary = (f"{describe(sae)}; trained on {len(data) if torch.is_tensor(data) else data.n_tokens} captured vectors, "
                   f"{final.get('step', 0)} steps, final {loss} {final.get(loss, float('nan')):.4f}, "
                   f"{result.rejected_batches} batches with NaN/inf rejected; saved as {name}{SAVED_SUFFIX}")
        shown = {**ui.PreviewText(summary).as_dict(), **ui.PreviewImage(chart, cls=cls).as_dict()}
        return io.NodeOutput(sae, chart, summary, ui=shown)
