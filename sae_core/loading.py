"""``load_dictionary``: one entry point for every dictionary a user may hand us.

Accepted: a native ``.safetensors`` file; a folder in our, SAELens, sparsify,
SDLens or seed-A ITDA layout; or a Hugging Face Hub id
``hf://owner/name[/sub/folder][@revision]`` (also without ``hf://`` when no
local path of that name exists), fetched with ``huggingface_hub`` (from its
cache when offline).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Union

import torch
from safetensors import safe_open

from .errors import DictionaryError
from .fileformat import FORMAT, load_native
from .foreign import load_saelens, load_sdlens, load_seed_itda, load_sparsify, read_json
from .itda import ITDA
from .sae import SparseAutoencoder

Dictionary = Union[SparseAutoencoder, ITDA]
HUB_ID = re.compile(r"^(?:hf://)?(?P<repo>[\w.-]+/[\w.-]+)(?P<sub>(?:/[\w.-]+)*)(?:@(?P<rev>[\w./-]+))?$")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

LAYOUTS = "a Diffusion SAE .safetensors file, or a folder with SAELens (cfg.json + sae_weights.safetensors), " \
          "sparsify (cfg.json + sae.safetensors), SDLens (config.json + state_dict.pth) or seed-A ITDA files"


def detect_layout(folder: Path) -> Callable[[Path], Dictionary]:
    """Which reader understands ``folder``, from the files it contains."""
    files = {p.name for p in folder.iterdir()}
    if {"cfg.json", "sae_weights.safetensors"} <= files:
        return load_saelens
    if {"cfg.json", "sae.safetensors"} <= files:
        cfg = read_json(folder / "cfg.json")
        return load_seed_itda if "target_l0" in cfg or "dictionary_size" in cfg else load_sparsify
    if {"config.json", "state_dict.pth"} <= files:
        return load_sdlens
    native = sorted(p for p in folder.glob("*.safetensors") if _header_format(p) == FORMAT)
    if len(native) == 1:
        return lambda _folder: load_native(native[0])
    if len(native) > 1:
        raise DictionaryError(f"{folder} holds several dictionaries ({', '.join(p.name for p in native)}); pass one file")
    raise DictionaryError(f"{folder}: no dictionary layout recognised among {', '.join(sorted(files)) or 'no files'}; expected {LAYOUTS}")


def _header_format(path: Path) -> str | None:
    """The ``format`` entry of a safetensors header; "" when absent, None when unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format", "")
    except Exception:  # unreadable files are reported by the loader that tries them
        return None


def load_dictionary(source: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None) -> Dictionary:
    """Load a dictionary from a file, a folder or a Hub id (see the module docstring)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise DictionaryError(f"{path}: a bare {path.suffix} file is not a dictionary layout; pass its folder ({LAYOUTS})")
        if path.suffix == ".safetensors" and _header_format(path) not in (None, FORMAT):
            return detect_layout(path.parent)(path.parent).to(device)  # e.g. SAELens' sae_weights.safetensors
        return load_native(path, device)
    if path.is_dir():
        return detect_layout(path)(path).to(device)
    match = HUB_ID.match(str(source))
    if match is None or (not str(source).startswith("hf://") and str(source).startswith((".", "/", "~"))):
        raise DictionaryError(f"{source}: no such file or folder; check the path (or give a Hub id as hf://owner/name/subfolder)")
    return load_dictionary(_download(match["repo"], match["sub"].strip("/"), revision or match["rev"]), device)


def _download(repo: str, sub: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo, revision=revision, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as err:  # offline, missing repo, auth: all need the same advice
        raise DictionaryError(
            f"could not fetch {repo}{'/' + sub if sub else ''} from the Hugging Face Hub ({type(err).__name__}); "
            "when offline (HF_HUB_OFFLINE=1) it must already be in the local HF cache; or pass a local path instead"
        ) from err
    folder = Path(root) / sub
    if not folder.exists():
        raise DictionaryError(f"{repo} has no folder {sub!r}; check the subfolder name")
    return folder


def check_site_width(dictionary: Dictionary, d_in: int, site_name: str) -> None:
    """Refuse a dictionary whose width does not fit the site it is applied to."""
    if dictionary.d_in != d_in:
        raise DictionaryError(
            f"dictionary for {dictionary.site} has d_in={dictionary.d_in} but site {site_name} has width {d_in}; "
            "load a dictionary trained on this site (or pick the site it was trained on)"
        )
