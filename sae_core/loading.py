"""``load_dictionary``: the one entry point for every dictionary a user may hand us.

Sources, tried in this order:

* an existing **file**: a native ``.safetensors`` dictionary (see
  :mod:`sae_core.fileformat`); any other file of a folder in a known layout
  (e.g. SAELens' ``sae_weights.safetensors`` or SDLens' ``state_dict.pth``,
  as a file picker hands them over) loads that folder;
* an existing **folder**: its layout is recognised from the files present:
  SAELens (``cfg.json`` + ``sae_weights.safetensors``), sparsify or seed-A ITDA
  (``cfg.json`` + ``sae.safetensors``, told apart by the cfg's keys), SDLens
  (``config.json`` + ``state_dict.pth``), or ours (exactly one native
  ``.safetensors`` file); readers are in :mod:`sae_core.foreign`;
* a **Hugging Face Hub id** ``hf://owner/name[/sub/folder][@revision]``, or the
  same without ``hf://`` when no such local path exists: fetched with
  ``huggingface_hub.snapshot_download`` (only the subfolder, or the one file
  when the id ends in a file name), which answers from the local HF cache when
  offline (``HF_HUB_OFFLINE=1``); then the local rules apply.

Every failure is a :class:`~sae_core.errors.DictionaryError` that names the
source and says what to do.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .errors import DictionaryError
from .fileformat import FORMAT, Dictionary, load_native
from .foreign import (
    SAELENS_FILES,
    SDLENS_FILES,
    SEED_ITDA_KEYS,
    SPARSIFY_FILES,
    load_saelens,
    load_sdlens,
    load_seed_itda,
    load_sparsify,
    read_json,
    short_reason,
)

Reader = Callable[[Path], Dictionary]

HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?P<sub>(?:/[\w.-]+)*)/?(?:@(?P<revision>[\w./-]+))?$")
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".json")
"""Names ending like this are files: a missing ``models/x.safetensors`` is a local path, not a Hub id."""

LAYOUTS = (
    "a Diffusion SAE .safetensors file, or a folder in SAELens (cfg.json + sae_weights.safetensors), "
    "sparsify or seed-A ITDA (cfg.json + sae.safetensors), or SDLens (config.json + state_dict.pth) layout"
)


def load_dictionary(source: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None) -> Dictionary:
    """Load a dictionary from a file, a folder or a Hub id (see the module docstring).

    ``revision`` (branch, tag or commit) applies to Hub ids; it may also be given
    as an ``@revision`` suffix."""
    if not str(source).strip():
        raise DictionaryError("no dictionary given: pass a .safetensors file, a folder or a Hub id (hf://owner/name/subfolder)")
    path = Path(source).expanduser()
    if not path.exists():
        path = _resolve_hub_id(source, revision)
    dictionary = _load_file(path) if path.is_file() else _load_folder(path)
    return dictionary.to(device)


def check_site_width(dictionary: Dictionary, d_in: int, site_name: str) -> None:
    """Refuse a dictionary whose width does not fit the site it is about to be applied to."""
    if dictionary.d_in != d_in:
        raise DictionaryError(
            f"dictionary {dictionary.site} has d_in={dictionary.d_in} but site {site_name} has width {d_in}; "
            "load a dictionary trained on this site, or pick the site it was trained on"
        )


# --- local files and folders ----------------------------------------------------------------


def _load_file(path: Path) -> Dictionary:
    if path.suffix == ".safetensors" and _header_format(path) != "":
        return load_native(path)  # ours, or unreadable: load_native says which
    reader = _folder_reader(path.parent)
    if reader is not None:
        return reader(path.parent)
    if path.suffix == ".safetensors":
        return load_native(path)  # explains that this safetensors file is not a dictionary
    raise DictionaryError(
        f"{path}: a lone {path.suffix or 'extension-less'} file is not a dictionary layout; pass {LAYOUTS} "
        "(an SDLens .pth belongs in a folder with its config.json, named state_dict.pth)"
    )


def _load_folder(folder: Path) -> Dictionary:
    reader = _folder_reader(folder)
    if reader is not None:
        return reader(folder)
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    hint = "; if it holds one dictionary per subfolder, pass one of those" if any(e.endswith("/") for e in entries) else ""
    raise DictionaryError(
        f"{folder}: no dictionary layout recognised among {', '.join(entries) or 'no files'}; expected {LAYOUTS}{hint}"
    )


def _folder_reader(folder: Path) -> Reader | None:
    """The reader for ``folder``'s layout, from the files it holds; None if none fits."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    if set(SAELENS_FILES) <= names:
        return load_saelens
    if set(SPARSIFY_FILES) <= names:
        cfg = read_json(folder / "cfg.json")
        return load_seed_itda if any(key in cfg for key in SEED_ITDA_KEYS) else load_sparsify
    if set(SDLENS_FILES) <= names:
        return load_sdlens
    return _native_reader(folder)


def _native_reader(folder: Path) -> Reader | None:
    """Ours: the one native file of the folder. A damaged file counts as one, so that
    loading it reports the damage rather than an unknown layout."""
    candidates = sorted(p for p in folder.glob("*.safetensors") if p.is_file() and _header_format(p) in (FORMAT, None))
    if len(candidates) > 1:
        raise DictionaryError(f"{folder} holds several dictionaries ({', '.join(p.name for p in candidates)}); pass one file")
    return (lambda _folder: load_native(candidates[0])) if candidates else None


def _header_format(path: Path) -> str | None:
    """The ``format`` entry of a safetensors header: "" when absent, None when unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format", "")
    except (SafetensorError, OSError, ValueError):
        return None


# --- Hub ids ---------------------------------------------------------------------------------


def _resolve_hub_id(source: str | os.PathLike, revision: str | None) -> Path:
    """The local path (in the HF cache) of Hub id ``source``, downloading what is missing.

    Only strings can be Hub ids: a ``Path`` that does not exist is a missing local path."""
    text = os.fspath(source)
    looks_local = not isinstance(source, str) or (
        not text.startswith("hf://") and (text.startswith((".", "~")) or text.lower().endswith(FILE_SUFFIXES))
    )
    match = None if looks_local else HUB_ID.match(text.removeprefix("hf://"))
    if match is None:
        raise DictionaryError(f"{source}: no such file or folder; check the path (a Hub id looks like hf://owner/name/subfolder)")
    if revision and match["revision"] and revision != match["revision"]:
        raise DictionaryError(f"{source}: revision {revision!r} contradicts the id's @{match['revision']}; give one of them")
    repo, sub = match["repo"], match["sub"].strip("/")
    rev = revision or match["revision"]
    patterns = [sub] if sub.lower().endswith(FILE_SUFFIXES) else [f"{sub}/*"] if sub else None
    root = _snapshot(repo, sub, rev, patterns)
    target = root / sub
    if not target.exists():
        raise DictionaryError(f"{repo}{'@' + rev if rev else ''} has no {sub!r}; check the name of the subfolder or file")
    return target


def _snapshot(repo: str, sub: str, revision: str | None, patterns: list[str] | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline, not found, gated, network down: all need the same advice; the cause is chained
        where = "/".join(filter(None, [repo, sub])) + (f"@{revision}" if revision else "")
        raise DictionaryError(
            f"could not fetch {where} from the Hugging Face Hub ({type(err).__name__}: {short_reason(err)}); "
            f"when offline (HF_HUB_OFFLINE=1) it must already be in the local HF cache ({constants.HF_HUB_CACHE}); "
            "check the id, or pass a local path instead"
        ) from err
