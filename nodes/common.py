"""What the node files share: the plugin's custom types, inputs that several nodes take, the ``models/sae``
folder, and the translation of ComfyUI values (strings, IMAGE/MASK tensors, folders) into the engine's.

Everything that does real work lives in ``sae_core`` and ``nodes/adapters``.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from comfy_api.latest import io

from ..sae_core import ConfigError, InputError, SAEError, ScheduleError, SteerError

CATEGORY = "Diffusion SAE"
DICTIONARY = io.Custom("SAE_DICTIONARY")
"""A loaded or trained dictionary (``sae_core`` SparseAutoencoder or ITDA)."""
CAPTURE = io.Custom("SAE_CAPTURE")
"""Capture Activations' handle on what it recorded (``capture_nodes.Capture``)."""
RECORDING = io.Custom("SAE_RECORDING")
"""Record Features' handle on a generation's feature activations (``inspect_nodes.Recording``)."""
SAE_FOLDER = "sae"
SAE_EXTENSIONS = {".safetensors"}
SHIPPED_SAE = Path(__file__).resolve().parents[1] / "models" / "sae"
"""The plugin's own dictionaries (one per model organism, each with its feature index): a second models/sae."""
INDEX_SUFFIX = ".features"
"""A feature index folder beside its dictionary: ``<name>.features/``."""
SITE_HELP = ("where in the model: block:stream, e.g. double_blocks.1:image, single_blocks.0:image (Flux), "
             "transformer_blocks.3:text (Qwen-Image), blocks.5:update (Wan), output_blocks.1:residual (SD1.5); "
             "diffusers' block names work too; the node's error lists the model's sites")
SIGMA_MAX = 1e4
"""The sigma widgets' top value: "no upper bound"."""
LISTED_CHOICES = 20
"""A refused choice's message lists the valid ones up to this many (ComfyUI's own limit)."""
MAX_NAME_BYTES = 255
"""The longest file or folder name common file systems take."""
MAX_FOLDER_BYTES = 1024
"""The longest folder input taken: well inside the file systems' path limit, with room for the output folder."""


def site_input(default: str) -> io.String.Input:
    """The ``site`` input every node that reads or edits a site has, with one tooltip for all."""
    return io.String.Input("site", default=default, tooltip=SITE_HELP)


def window_inputs(start: float, end: float, acts: str) -> list[io.Float.Input]:
    """``window_start`` / ``window_end``: the part of sampling (0 = first step, 1 = last) in which ``acts``."""
    return [io.Float.Input("window_start", default=start, min=0.0, max=1.0, step=0.01,
                           tooltip=f"{acts} from this point of sampling on (0: the first step, 1: the last)"),
            io.Float.Input("window_end", default=end, min=0.0, max=1.0, step=0.01,
                           tooltip=f"{acts} until this point of sampling (inclusive; 1: the last step)")]


def sampling_inputs(seed: str, steps: str, cfg: str = "guidance scale", prefix: str = "") -> list[io.Input]:
    """``seed``, ``steps``, ``cfg``, ``sampler_name``, ``scheduler`` as KSampler has them, for nodes that sample
    inside themselves; ``seed``/``steps``/``cfg`` are those inputs' tooltips, ``prefix`` opens every tooltip."""
    import comfy.samplers

    return [io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip=prefix + seed),
            io.Int.Input("steps", default=20, min=1, max=1000, tooltip=prefix + steps),
            io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, tooltip=prefix + cfg),
            io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                           tooltip=prefix + "the sampler, as in KSampler"),
            io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="simple",
                           tooltip=prefix + "the noise schedule, as in KSampler")]


def check_choices(node: type[io.ComfyNode], **values: Any) -> bool | str:
    """True when each value is one of its Combo input's options, else the message naming the first that is not.

    ComfyUI 0.3.75 checks a V1 list input's value before running a workflow but not a V3 Combo's (its
    validator compares only list-typed inputs), so nodes call this from ``validate_inputs``: a workflow
    with a choice that no longer exists is refused when queued, as before. A linked value arrives as None
    and is not checked (see :func:`require_choices`)."""
    return _refused_choice(node, {name: value for name, value in values.items() if value is not None}) or True


def require_choices(node: type[io.ComfyNode], **values: Any) -> None:
    """ConfigError unless each value is one of its Combo input's options: the run-time half of
    :func:`check_choices`, for a value the validator could not see (a link, or a JSON null sent by a script)."""
    refused = _refused_choice(node, values)
    if refused:
        raise ConfigError(f"{refused}: pick one of the node's choices")


def _refused_choice(node: type[io.ComfyNode], values: dict[str, Any]) -> str:
    """The message naming the first value that is not one of its Combo input's options, or ""."""
    options = {i.id: i.options for i in node.define_schema().inputs if isinstance(i, io.Combo.Input)}
    for name, value in values.items():
        if value not in options[name]:
            valid = options[name]
            listed = ", ".join(map(str, valid)) if len(valid) <= LISTED_CHOICES else f"{len(valid)} choices"
            return f"{name} {value!r} is not one of: {listed}"
    return ""


def require_linked(value: Any, expected: type, input_name: str, source: str) -> None:
    """InputError unless ``value`` is an ``expected``: through the API a script may send any JSON value for an
    input that takes another node's output."""
    if not isinstance(value, expected):
        raise InputError(f"{input_name} is a {type(value).__name__}, not the output of {source}: connect {source}")


def register_sae_folder() -> None:
    """Make ``models/sae`` a ComfyUI model folder, with the plugin's own ``models/sae`` (the organisms' shipped
    dictionaries and their feature indexes) after it (cheap; safe to call more than once)."""
    import folder_paths

    if SAE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[SAE_FOLDER] = ([os.path.join(folder_paths.models_dir, SAE_FOLDER)],
                                                           set(SAE_EXTENSIONS))
    else:
        folder_paths.folder_names_and_paths[SAE_FOLDER][1].update(SAE_EXTENSIONS)
    paths = folder_paths.folder_names_and_paths[SAE_FOLDER][0]
    if str(SHIPPED_SAE) not in paths:
        paths.append(str(SHIPPED_SAE))


def sae_files() -> list[str]:
    """The dictionary files ComfyUI lists in ``models/sae``, without the files inside feature indexes
    (``<name>.features/``), which share the ``.safetensors`` extension."""
    import folder_paths

    return [name for name in folder_paths.get_filename_list(SAE_FOLDER)
            if not any(part.endswith(INDEX_SUFFIX) for part in Path(name).parts[:-1])]


def sae_save_dir() -> str:
    """The first ``models/sae`` folder: where trained dictionaries go."""
    import folder_paths

    path = folder_paths.get_folder_paths(SAE_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path


def output_folder(folder: str, input_name: str = "folder") -> Path:
    """``folder`` inside ComfyUI's output folder, for a folder input that a workflow may set to anything.

    Only a relative path that stays inside the output folder is taken (no absolute path, ``~`` or ``..``
    out of it, nor a symlink that leads out), so that a workflow from anywhere reads and writes nowhere
    else; its messages echo the value as typed, never the server's own paths."""
    import folder_paths

    text = str(folder).strip()
    problem = _folder_text_problem(text)
    if problem:
        raise InputError(f"{input_name} {folder!r} {problem}: give a relative path inside ComfyUI's output folder, "
                         "e.g. sae_activations/run1")
    output = Path(folder_paths.get_output_directory()).resolve()
    directory = (output / text).resolve()
    if output not in directory.parents:
        where = "is the output folder itself" if directory == output else "leaves ComfyUI's output folder"
        raise InputError(f"{input_name} {folder!r} {where}: give a relative path inside ComfyUI's output folder, "
                         "e.g. sae_activations/run1")
    blocker = next(p for p in (directory, *directory.parents) if p.exists())
    if not blocker.is_dir():
        raise InputError(f"{input_name} {folder!r}: {blocker.relative_to(output).as_posix()} is a file in ComfyUI's "
                         "output folder, not a folder; pick another name")
    return directory


def _folder_text_problem(text: str) -> str:
    """Why ``text`` cannot name a folder inside the output folder, or "" when it may."""
    if not text:
        return "is empty"
    if any(ord(c) < 32 for c in text):
        return "holds control characters"
    if Path(text).is_absolute() or text.startswith(("~", "/", "\\")):
        return "is not a relative path"
    if len(text.encode()) > MAX_FOLDER_BYTES:
        return f"is longer than {MAX_FOLDER_BYTES} bytes"
    if any(len(part.encode()) > MAX_NAME_BYTES for part in Path(text).parts):
        return f"has a name longer than {MAX_NAME_BYTES} bytes"
    return ""


def relative_to_output(directory: Path) -> str:
    """``directory`` as a workflow names it: relative to ComfyUI's output folder (what a folder input takes)."""
    import folder_paths

    return directory.relative_to(Path(folder_paths.get_output_directory()).resolve()).as_posix()


@contextmanager
def paths_named_from_output() -> Iterator[None]:
    """Project errors raised inside name folders by their place in ComfyUI's output folder (``output/...``),
    as workflows do, rather than by the server's absolute path."""
    import folder_paths

    try:
        yield
    except SAEError as err:
        output = str(Path(folder_paths.get_output_directory()).resolve())
        if output not in str(err):
            raise
        raise type(err)(str(err).replace(output, "output")) from err


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
    for name, value in (("window_start", start), ("window_end", end)):
        if not 0.0 <= value <= 1.0:  # NaN too
            raise ScheduleError(f"{name} {value}: use a point of sampling from 0 (the first step) to 1 (the last)")
    if start > end:
        raise ScheduleError(f"window start {start} is after its end {end}: start must be <= end (0..1)")
    return None if (start <= 0.0 and end >= 1.0) else (float(start), float(end))


def sigma_range(low: float, high: float) -> Optional[tuple[float, float]]:
    """The widgets' sigma bounds as a gate, or None when they leave every sigma in."""
    for name, value in (("sigma_min", low), ("sigma_max", high)):
        if not 0.0 <= value <= SIGMA_MAX:  # NaN too
            raise ScheduleError(f"{name} {value}: use a noise level from 0 to {SIGMA_MAX:g} (no upper bound)")
    if low > high:
        raise ScheduleError(f"sigma_min {low} is above sigma_max {high}: swap them")
    return None if (low <= 0.0 and high >= SIGMA_MAX) else (float(low), float(high))


def describe(dictionary) -> str:
    return (f"{dictionary.kind} dictionary: d_in={dictionary.d_in}, n_latents={dictionary.n_latents}, "
            f"k={dictionary.k}, site={dictionary.site}")


def pil_to_image(pil) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE ``(1, H, W, 3)`` float in [0, 1]."""
    array = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def mask_2d(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A ComfyUI MASK ``(B, H, W)`` or ``(H, W)`` -> one ``(H, W)`` map (the first of a batch); SteerError for
    anything else, so that a mask from an odd node is refused before sampling rather than inside it."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or 0 in mask.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SteerError(f"mask shaped {shape} is not a painted mask: connect a MASK of shape (H, W) or (batch, H, W)")
    if mask.is_complex():
        raise SteerError(f"mask of dtype {mask.dtype} is not a painted mask: connect a MASK of weights 0..1")
    return mask[0] if mask.ndim == 3 else mask


def checked_images(images: Any, input_name: str = "images") -> torch.Tensor:
    """A ComfyUI IMAGE ``(batch, H, W, 3 or 4)``, finite floats, as its RGB ``(batch, H, W, 3)``; InputError
    naming ``input_name`` for anything else (a mask, a latent, a uint8 picture)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4) \
            or 0 in images.shape:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"{input_name} shaped {shape} are not ComfyUI images: connect an IMAGE "
                         "(batch, height, width, 3)")
    if not images.is_floating_point():
        raise InputError(f"{input_name} of dtype {images.dtype} are not ComfyUI images: connect an IMAGE of floats "
                         "in [0, 1] (e.g. from Load Image or VAE Decode)")
    if not bool(torch.isfinite(images).all()):
        raise InputError(f"{input_name} hold NaN or infinite pixels: connect an IMAGE of floats in [0, 1]")
    return images[..., :3]
