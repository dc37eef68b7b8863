"""Small helpers shared by the node files: custom types, the ``models/sae`` folder, site and feature parsing.

Everything that does real work lives in ``sae_core`` and ``nodes/adapters``; this file only translates
between ComfyUI's values (strings, IMAGE/MASK tensors, folders) and theirs.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
import torch

from ..sae_core import DictionaryError, Site

CATEGORY = "Diffusion SAE"
DICTIONARY = "SAE_DICTIONARY"
CAPTURE = "SAE_CAPTURE"
RECORDING = "SAE_RECORDING"
SAE_FOLDER = "sae"
SAE_EXTENSIONS = {".safetensors"}
SITE_HELP = ("block:stream, e.g. double_blocks.1:image, single_blocks.0:image (Flux), "
             "output_blocks.1:residual (SD1.5); the node's error lists the model's sites")


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


def resolve_site(model, name: str):
    """``(adapter, site, width)`` for a site name on this MODEL; DictionaryError names the valid ones."""
    from .adapters import adapter_for

    adapter = adapter_for(model)
    sites = adapter.available_sites(model)
    wanted = name.strip()
    for site in sites:
        if site.name == wanted or str(site) == wanted:
            return adapter, site, site_width(adapter, model, site)
    if ":" in wanted:  # another runtime's name for one of these sites (diffusers' U-Net blocks)
        block, stream = wanted.rsplit(":", 1)
        try:
            site = adapter.resolve(model, Site(family="unknown", block=block, stream=stream))
            return adapter, site, site_width(adapter, model, site)
        except DictionaryError:
            pass  # reported below, with the sites this model has
    raise DictionaryError(f"unknown site {wanted!r} for this model; available sites: "
                          + ", ".join(s.name for s in sites))


def site_width(adapter, model, site: Site) -> int:
    """Width ``d`` of the activations at ``site``."""
    for attr in ("site_width", "width"):
        fn = getattr(adapter, attr, None)
        if callable(fn):
            return int(fn(model, site))
    for key in ("d", "d_in", "width"):
        if key in site.extra:
            return int(site.extra[key])
    hidden = getattr(model.model.diffusion_model, "hidden_size", None)
    if hidden is None:
        raise DictionaryError(f"cannot tell the width of site {site}: the model adapter does not report it")
    return int(hidden)


def parse_features(text: str) -> list[int]:
    """``"3, 17,42"`` -> ``[3, 17, 42]``."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    if not parts:
        raise DictionaryError("no feature ids given: type comma-separated integers, e.g. 3, 17")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise DictionaryError(f"feature ids must be integers separated by commas, got {text!r}") from None


def window(start: float, end: float) -> Optional[tuple[float, float]]:
    if start > end:
        raise DictionaryError(f"window start {start} is after its end {end}: start must be <= end (0..1)")
    return None if (start <= 0.0 and end >= 1.0) else (float(start), float(end))


SIGMA_MAX = 1e4  # the widget's top value: "no upper bound"


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
