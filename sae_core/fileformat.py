"""The dictionary file: one ``.safetensors`` file with a JSON header.

Layout: the module's state dict as tensors, plus header metadata
``{"format": "diffusion-sae", "format_version": "1", "config": <json>}`` where
``config`` holds kind, d_in, n_latents, k, the site, normalisation and
training statistics (see each dictionary's ``config()``). Any other layout
(SAELens, sparsify, SDLens, seed-A ITDA, Hub ids) is handled by
:mod:`sae_core.foreign`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .atomic import save_safetensors_atomic
from .dictionary import Dictionary
from .errors import ConfigError, DictionaryError
from .itda import ITDA
from .sae import SAE_KINDS, SparseAutoencoder

FORMAT = "diffusion-sae"
FORMAT_VERSION = "1"



def dictionary_class(kind: str) -> type:
    if kind in SAE_KINDS:
        return SparseAutoencoder
    if kind == "itda":
        return ITDA
    raise DictionaryError(f"unknown dictionary kind {kind!r}; this version reads {', '.join(SAE_KINDS + ('itda',))}")


def save_dictionary(dictionary: Dictionary, path: str | os.PathLike) -> Path:
    """Write ``dictionary`` to ``path`` atomically (a failed save leaves no partial file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DictionaryError(f"{path}: dictionaries are saved as .safetensors files; add that extension")
    check_finite(dictionary, path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(dictionary.config()),
    }
    return save_safetensors_atomic(path, dictionary.state_dict(), metadata)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The config of a dictionary file, without reading its tensors (cheap, for UIs)."""
    path = Path(path)
    metadata = _open(path, lambda f: f.metadata()) or {}
    if metadata.get("format") != FORMAT:
        raise DictionaryError(
            f"{path} is a safetensors file but not a Diffusion SAE dictionary (no '{FORMAT}' header); "
            "load its folder instead if it comes from SAELens, sparsify, SDLens or seed-A ITDA"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DictionaryError(f"{path} has format version {metadata.get('format_version')}; this version reads {FORMAT_VERSION}: update diffusion-sae")
    try:
        return json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise DictionaryError(f"{path}: the dictionary header is damaged ({err}); re-save or re-download the file") from err


def load_native(path: str | os.PathLike, device: str | torch.device = "cpu") -> Dictionary:
    """Load a file written by :func:`save_dictionary`."""
    path = Path(path)
    config = read_header(path)
    try:
        dictionary = dictionary_class(str(config.get("kind"))).from_config(config)
    except (ConfigError, KeyError, TypeError) as err:  # the header's shape is the file's fault, not a setting's
        raise DictionaryError(f"{path}: the dictionary header is damaged ({err}); re-save or re-download the file") from err
    tensors = _open(path, lambda f: {name: f.get_tensor(name) for name in f.keys()})
    try:
        dictionary.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise DictionaryError(f"{path}: tensors do not match the header ({first[-1].strip() if first else err}); the file is damaged, re-save it") from err
    check_finite(dictionary, path)
    return dictionary.to(device)


def check_finite(dictionary: torch.nn.Module, path: str | os.PathLike) -> None:
    for name, tensor in dictionary.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DictionaryError(f"{path}: tensor '{name}' contains NaN or inf; this dictionary diverged in training, use an earlier checkpoint")


def _open(path: Path, read):
    if not path.is_file():
        raise DictionaryError(f"{path}: no such file; check the path or the models/sae folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except (SafetensorError, OSError, ValueError) as err:
        raise DictionaryError(f"{path} is truncated or not a valid safetensors file ({err}); re-download or re-save it") from err
