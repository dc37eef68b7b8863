"""What the node files share: the plugin's custom types, inputs that several nodes take, the ``models/sae``
folder, and the translation of ComfyUI values (strings, IMAGE/MASK tensors, folders) into the engine's.

Everything that does real work lives in ``sae_core`` and ``nodes/adapters``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from comfy_api.latest import io

from ..sae_core import InputError, ScheduleError, SteerError

CATEGORY = "Diffusion SAE"
DICTIONARY = io.Custom("SAE_DICTIONARY")
"""A loaded or trained dictionary (``sae_core`` SparseAutoencoder or ITDA)."""
CAPTURE = io.Custom("SAE_CAPTURE")
"""Capture Activations' handle on what it recorded (``capture_nodes.Capture``)."""
RECORDING = io.Custom("SAE_RECORDING")
"""Record Features' handle on a generation's feature activations (``inspect_nodes.Recording``)."""
SAE_FOLDER = "sae"
SAE_EXTENSIONS = {".safetensors"}
SITE_HELP = ("where in the model: block:stream, e.g. double_blocks.1:image, single_blocks.0:image (Flux), "
             "transformer_blocks.3:text (Qwen-Image), blocks.5:update (Wan), output_blocks.1:residual (SD1.5); "
             "diffusers' block names work too; the node's error lists the model's sites")
SIGMA_MAX = 1e4
"""The sigma widgets' top value: "no upper bound"."""
LISTED_CHOICES = 20
"""A refused choice's message lists the valid ones up to this many (ComfyUI's own limit)."""


def site_input(default: str) -> io.String.Input:
    """The ``site`` input every node that reads or edits a site has, with one tooltip for all."""
    return io.String.Input("site", default=default, tooltip=SITE_HELP)


def window_inputs(start: float, end: float, acts: str) -> list[io.Float.Input]:
    """``window_start`` / ``window_end``: the part of sampling (0 = first step, 1 = last) in which ``acts``."""
    return [io.Float.Input("window_start", default=start, min=0.0, max=1.0, step=0.01,
                           tooltip=f"{acts} from this point of sampling on (0: the first step, 1: the last)"),
            io.Float.Input("window_end", default=end, min=0.0, max=1.0, step=0.01,
                           tooltip=f"{acts} until this point of sampling (inclusive; 1: the last step)")]


def check_choices(node: type[io.ComfyNode], **values: Any) -> bool | str:
    """True when each value is one of its Combo input's options, else the message naming the first that is not.

    ComfyUI 0.3.75 checks a V1 list input's value before running a workflow but not a V3 Combo's (its
    validator compares only list-typed inputs), so nodes call this from ``validate_inputs``: a workflow
    with a choice that no longer exists is refused when queued, as before. A linked value arrives as None
    and is not checked."""
    options = {i.id: i.options for i in node.define_schema().inputs if isinstance(i, io.Combo.Input)}
    for name, value in values.items():
        if value is not None and value not in options[name]:
            valid = options[name]
            listed = ", ".join(map(str, valid)) if len(valid) <= LISTED_CHOICES else f"{len(valid)} choices"
            return f"{name} {value!r} is not one of: {listed}"
    return True


def register_sae_folder() -> None:
    """Make ``models/sae`` a ComfyUI model folder (cheap; safe to call more than once)."""
    import folder_paths

    if SAE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[SAE_FOLDER] = ([os.path.join(folder_paths.models_dir, SAE_FOLDER)],
                                                           set(SAE_EXTENSIONS))
    else:
        folder_paths.folder_names_and_paths[SAE_FOLDER][1].update(SAE_EXTENSIONS)


def sae_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(SAE_FOLDER)


def sae_save_dir() -> str:
    """The first ``models/sae`` folder: where trained dictionaries go."""
    import folder_paths

    path = folder_paths.get_folder_paths(SAE_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path


def output_folder(folder: str) -> Path:
    """``folder`` inside ComfyUI's output folder; InputError for an empty one or one that leaves it."""
    import folder_paths

    output = Path(folder_paths.get_output_directory()).resolve()
    directory = (output / folder.strip()).resolve()
    if not folder.strip() or output not in directory.parents:
        raise InputError(f"capture folder {folder!r} must be a relative path inside ComfyUI's output folder")
    return directory


def resolve_site(model, name: str):
    """``(adapter, site, width)`` for a site name (in either runtime's naming) on this MODEL; the SiteError for
    an unknown one lists the model's sites."""
    from .adapters import adapter_for

    adapter = adapter_for(model)
    site = adapter.resolve(model, name)
    return adapter, site, int(site.extra["d"])


def parse_features(text: str) -> list[int]:
    """``"3, 17,42"`` -> ``[3, 17, 42]``."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    if not parts:
        raise SteerError("no feature ids given: type comma-separated integers, e.g. 3, 17")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise SteerError(f"feature ids must be integers separated by commas, got {text!r}") from None


def window(start: float, end: float) -> Optional[tuple[float, float]]:
    """The widgets' progress window, or None when it spans all of sampling."""
    if start > end:
        raise ScheduleError(f"window start {start} is after its end {end}: start must be <= end (0..1)")
    return None if (start <= 0.0 and end >= 1.0) else (float(start), float(end))


def sigma_range(low: float, high: float) -> Optional[tuple[float, float]]:
    """The widgets' sigma bounds as a gate, or None when they leave every sigma in."""
    return None if (low <= 0.0 and high >= SIGMA_MAX) else (float(low), float(high))


def describe(dictionary) -> str:
    return (f"{dictionary.kind} dictionary: d_in={dictionary.d_in}, n_latents={dictionary.n_latents}, "
            f"k={dictionary.k}, site={dictionary.site}")


def pil_to_image(pil) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE ``(1, H, W, 3)`` float in [0, 1]."""
    array = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def mask_2d(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A ComfyUI MASK ``(B, H, W)`` or ``(H, W)`` -> one ``(H, W)`` map (the first of a batch)."""
    if mask is None:
        return None
    return mask[0] if mask.ndim == 3 else mask
