"""``load_dictionary``: the one entry point for every dictionary a user may hand us.

Sources, tried in this order:

* an existing **file**: a native ``.safetensors`` dictionary (see
  :mod:`sae_core.fileformat`); a file of a folder in a foreign layout (e.g.
  SAELens' ``sae_weights.safetensors`` or SDLens' ``state_dict.pth``, as a file
  picker hands them over) loads that folder. Any other file is refused, never
  replaced by another dictionary that happens to sit beside it;
* an existing **folder**: its layout is recognised from the files present:
  SAELens (``cfg.json`` + ``sae_weights.safetensors``), sparsify or seed-A ITDA
  (``cfg.json`` + ``sae.safetensors``, told apart by the cfg's keys), SDLens
  (``config.json`` + ``state_dict.pth``), or ours (exactly one native
  ``.safetensors`` file); readers are in :mod:`sae_core.foreign`;
* a **Hugging Face Hub id** ``hf://owner/name[/sub/folder][@revision]``, or the
  same without ``hf://`` when no such local path exists: fetched with
  ``huggingface_hub.snapshot_download`` (only the subfolder, or the one file
  when the id ends in a file name), which answers from the local HF cache when
  offline (``HF_HUB_OFFLINE=1``); then the local rules apply inside the cache.

With ``allow_local=False`` (what a UI passes for text a user typed) only the
last is tried: the source must be a Hub id by its syntax, each segment a name
(``[\\w][\\w.-]*``: no ``..``, no leading ``/`` or ``~``, no drive letter or
backslash), and nothing outside the HF cache is looked at.

Every failure is a :class:`~sae_core.errors.DictionaryError` that names the
source and says what to do; none lists a folder's contents.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .checks import printable, short_reason
from .errors import DictionaryError
from .fileformat import FORMAT, Dictionary, load_native
from .foreign import (
    SAELENS_FILES,
    SDLENS_FILES,
    SDLENS_STATISTICS,
    SEED_ITDA_KEYS,
    SPARSIFY_FILES,
    load_saelens,
    load_sdlens,
    load_seed_itda,
    load_sparsify,
    read_json,
)

Reader = Callable[[Path], Dictionary]

SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
HUB_ID = re.compile(
    rf"^(?P<repo>{SEGMENT}/{SEGMENT})(?P<sub>(?:/{SEGMENT})*)(?:@(?P<revision>{SEGMENT}(?:/{SEGMENT})*))?$"
)
"""``owner/name[/sub/...][@revision]``, each segment a plain name: nothing that climbs out of the cache."""
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".json")
"""Names ending like this are files: a missing ``models/x.safetensors`` is a local path, not a Hub id."""

LAYOUTS = (
    "a Diffusion SAE .safetensors file, or a folder in SAELens (cfg.json + sae_weights.safetensors), "
    "sparsify or seed-A ITDA (cfg.json + sae.safetensors), or SDLens (config.json + state_dict.pth) layout"
)


def load_dictionary(source: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None,
                    allow_local: bool = True) -> Dictionary:
    """Load a dictionary from a file, a folder or a Hub id (see the module docstring).

    ``revision`` (branch, tag or commit) applies to Hub ids; it may also be given
    as an ``@revision`` suffix. ``allow_local=False`` accepts Hub ids only."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise DictionaryError("no dictionary given: pass a .safetensors file, a folder or a Hub id (hf://owner/name/subfolder)")
    if allow_local:
        path = Path(source).expanduser()
        if not path.exists():
            path = _resolve_hub_id(_local_or_hub_id(source), revision, allow_local)
    else:
        path = _resolve_hub_id(_hub_id_only(source), revision, allow_local)
    if path.is_file():
        return _load_file(path).to(device)
    if path.is_dir():
        return _load_folder(path).to(device)
    raise DictionaryError(f"{path} is neither a file nor a folder; pass {LAYOUTS}")


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
    reader = _foreign_reader(path.parent)
    if reader is not None and path.name in reader[1]:
        return reader[0](path.parent)
    if path.suffix == ".safetensors":
        return load_native(path)  # explains that this safetensors file is not a dictionary
    raise DictionaryError(
        f"{path}: a lone {path.suffix or 'extension-less'} file is not a dictionary layout; pass {LAYOUTS} "
        "(an SDLens .pth belongs in a folder with its config.json, named state_dict.pth)"
    )


def _load_folder(folder: Path) -> Dictionary:
    foreign = _foreign_reader(folder)
    if foreign is not None:
        return foreign[0](folder)
    native = _native_file(folder)
    if native is not None:
        return load_native(native)
    has_subfolders = any(p.is_dir() for p in _entries(folder))
    hint = "; if it holds one dictionary per subfolder, pass one of those" if has_subfolders else ""
    raise DictionaryError(f"{folder}: no dictionary layout recognised; expected {LAYOUTS}{hint}")


def _foreign_reader(folder: Path) -> tuple[Reader, tuple[str, ...]] | None:
    """The reader of ``folder``'s foreign layout and the names of that layout's files; None if none fits."""
    names = {p.name for p in _entries(folder) if p.is_file()}
    if set(SAELENS_FILES) <= names:
        return load_saelens, SAELENS_FILES
    if set(SPARSIFY_FILES) <= names:
        cfg = read_json(folder / "cfg.json")
        return (load_seed_itda if any(key in cfg for key in SEED_ITDA_KEYS) else load_sparsify), SPARSIFY_FILES
    if set(SDLENS_FILES) <= names:
        return load_sdlens, SDLENS_FILES + SDLENS_STATISTICS
    return None


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise DictionaryError(f"{folder}: cannot read this folder ({short_reason(err)}); check that it exists and may be read") from err


def _native_file(folder: Path) -> Path | None:
    """Ours: the one native file of the folder. A damaged file counts as one, so that
    loading it reports the damage rather than an unknown layout."""
    candidates = sorted(p for p in _entries(folder)
                        if p.suffix == ".safetensors" and p.is_file() and _header_format(p) in (FORMAT, None))
    if len(candidates) > 1:
        raise DictionaryError(f"{folder} holds {len(candidates)} dictionaries; pass one file")
    return candidates[0] if candidates else None


def _header_format(path: Path) -> str | None:
    """The ``format`` entry of a safetensors header: "" when absent, None when unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format", "")
    except (SafetensorError, OSError, ValueError):
        return None


# --- Hub ids ---------------------------------------------------------------------------------


def _local_or_hub_id(source: str | os.PathLike) -> re.Match[str]:
    """A missing local path that reads as a Hub id. Only strings can be Hub ids: a ``Path`` that
    does not exist, or a string shaped like a relative path or a file name, is a missing local path."""
    text = os.fspath(source)
    looks_local = not isinstance(source, str) or (
        not text.startswith("hf://") and (text.startswith((".", "~")) or text.lower().endswith(FILE_SUFFIXES))
    )
    match = None if looks_local else HUB_ID.match(text.removeprefix("hf://"))
    if match is None:
        raise DictionaryError(f"{source}: no such file or folder; check the path (a Hub id looks like hf://owner/name/subfolder)")
    return match


def _hub_id_only(source: str | os.PathLike) -> re.Match[str]:
    """``source`` read as a Hub id by its syntax alone: no file system is consulted, and a refusal
    echoes nothing but the source itself."""
    match = HUB_ID.match(source.removeprefix("hf://")) if isinstance(source, str) else None
    if match is None:
        raise DictionaryError(
            f"{printable(os.fspath(source), 120)} is not a Hub id (hf://owner/name[/subfolder]); "
            "local files must be put in models/sae and picked from the list"
        )
    return match


def _resolve_hub_id(match: re.Match[str], revision: str | None, allow_local: bool) -> Path:
    """The local path (in the HF cache) of a Hub id, downloading what is missing."""
    source = match.string
    if revision and match["revision"] and revision != match["revision"]:
        raise DictionaryError(f"{source}: revision {printable(revision)} contradicts the id's @{match['revision']}; give one of them")
    if revision is not None and not re.fullmatch(rf"{SEGMENT}(?:/{SEGMENT})*", revision):
        raise DictionaryError(f"revision {printable(revision)} is not a branch, tag or commit name; check it")
    repo, sub = match["repo"], match["sub"].strip("/")
    rev = revision or match["revision"]
    patterns = [sub] if sub.lower().endswith(FILE_SUFFIXES) else [f"{sub}/*"] if sub else None
    root = _snapshot(repo, sub, rev, patterns, allow_local)
    target = root / sub
    if not target.exists():
        raise DictionaryError(f"{repo}{'@' + rev if rev else ''} has no {sub!r}; check the name of the subfolder or file")
    return target


def _snapshot(repo: str, sub: str, revision: str | None, patterns: list[str] | None, allow_local: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline, not found, gated, network down: all need the same advice; the cause is chained
        where = "/".join(filter(None, [repo, sub])) + (f"@{revision}" if revision else "")
        instead = "pass a local path instead" if allow_local else "put the file in models/sae and pick it from the list"
        raise DictionaryError(
            f"could not fetch {where} from the Hugging Face Hub ({type(err).__name__}: {short_reason(err)}); "
            "when offline (HF_HUB_OFFLINE=1) it must already be in the local Hugging Face cache; "
            f"check the id, or {instead}"
        ) from err
