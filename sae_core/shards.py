"""Captured activations: a bounded buffer in memory, shards on disk, a shuffling reader.

A dictionary for one site of a diffusion model is trained on millions of
activation vectors (Flux: 4,096 image tokens per 1024 px image, every
sampling step). They rarely fit in memory, capture takes hours and may be
killed, and training wants them in random order. Hence three pieces:

* :class:`ActivationBuffer`: a fixed-capacity in-memory capture for small
  jobs (a ComfyUI run, a test). An append fits whole or is refused whole, so
  the buffer never holds part of a sample.
* :class:`ShardWriter`: appends vectors to ``shard_00000.safetensors``,
  ``shard_00001.safetensors``... of ``shard_tokens`` vectors each, every one
  written atomically, plus a ``manifest.json`` rewritten (atomically) after
  each shard. The shard files are the truth: reopening a directory scans them,
  rebuilds the manifest, removes stray temp files and appends after the last
  shard, so a killed capture loses at most its unflushed remainder and resumes
  at :attr:`ShardWriter.next_sample_id`.
* :class:`ShardReader`: a re-iterable of batches
  ``{"activations", "sample_id", "token", "timestep"}`` for
  :func:`sae_core.train.train_dictionary`. It reads one shard at a time, visits
  shards in a random order and mixes tokens in a rolling shuffle buffer of
  ``buffer_tokens`` vectors (tokens of one image are highly correlated, so
  shard-order shuffling alone is not enough). Pass ``i`` of a reader is a pure
  function of ``(seed, i, rank)``: epochs differ, and a fresh reader replays the
  same sequence, which is what lets training resume exactly by re-reading and
  skipping the batches it had consumed. For data-parallel training
  (``torchrun``) each process opens the directory with its ``rank`` and
  ``world_size`` and reads only its own shards.

Shard layout: tensors ``activations (N, d)`` (float16, bfloat16 or float32),
``sample_id (N,) int64`` (which generated image / real image), ``token (N,)
int64`` (position in the site's token sequence) and ``timestep (N,) float32``
(the sigma it was captured at); header metadata ``format="diffusion-sae-shard"``,
``version="1"``, the site as JSON, the dtype, the largest sample id and a
``crc32`` of the tensors' bytes (checked when the shard is read; shards written
before it was added are read without it).

The manifest is checked when a reader opens the directory, against each
shard's header (cheap: no data is read): every entry names a file directly
inside the directory, once, whose rows, width, dtype, site and tensors are what
the manifest says, and the counts add up. Anything else is a ShardError that
names the manifest and the fix, so a damaged or hand-edited manifest can
neither read files from elsewhere nor feed training other data than it lists.
"""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open
from torch import Tensor

from .atomic import atomic_write, save_safetensors_atomic
from .errors import ConfigError, ShardError, WriteError
from .sites.site import Site

FORMAT = "diffusion-sae-shard"
VERSION = "1"
MANIFEST = "manifest.json"
PROVENANCE = ("sample_id", "token", "timestep")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_STORED_AS = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
"""safetensors' name of each activation dtype, as a header states it."""
_PROVENANCE_STORED_AS = {"sample_id": "I64", "token": "I64", "timestep": "F32"}
CHECKSUM = "crc32"
_REBUILD = "reopen the directory with ShardWriter and close() to rebuild the manifest from its shards"
_SHARD_NAME = re.compile(r"^shard_(\d+)\.safetensors$")
_FLOAT16_MAX = 65504.0

Rows = dict[str, Tensor]
"""Activations ``(N, d)`` with their provenance, keyed like a shard's tensors."""


# ----------------------------------------------------------------------------- rows


def _rows(acts: Tensor, sample_id: Union[int, Tensor], token: Optional[Tensor], timestep: Union[float, Tensor]) -> Rows:
    """Flatten ``acts: (..., d)`` to ``(N, d)`` with one provenance entry per vector, on the CPU.

    Provenance values broadcast to ``acts.shape[:-1]``; ``token=None`` numbers the
    vectors along the last leading axis (their position in the token sequence)."""
    acts = torch.as_tensor(acts).detach()
    if acts.ndim < 2:
        raise ShardError(f"activations must be shaped (N, d) or (..., d), got {tuple(acts.shape)}")
    lead = acts.shape[:-1]
    if token is None:
        token = torch.arange(lead[-1])
    try:
        provenance = {
            "sample_id": torch.as_tensor(sample_id, dtype=torch.int64).broadcast_to(lead),
            "token": torch.as_tensor(token, dtype=torch.int64).broadcast_to(lead),
            "timestep": torch.as_tensor(timestep, dtype=torch.float32).broadcast_to(lead),
        }
    except RuntimeError as err:
        raise ShardError(
            f"provenance does not fit activations shaped {tuple(acts.shape)} ({err}); "
            "give one sample_id / token / timestep per vector, or one for all"
        ) from err
    rows = {"activations": acts.reshape(-1, acts.shape[-1]).cpu()}
    rows.update({name: value.reshape(-1).cpu() for name, value in provenance.items()})
    return rows


def _n(rows: Rows) -> int:
    return rows["activations"].shape[0]


def _cat(chunks: list[Rows]) -> Rows:
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}


def _take(rows: Rows, index: Union[Tensor, slice]) -> Rows:
    return {name: value[index] for name, value in rows.items()}


def _check_width(expected: Optional[int], rows: Rows, holder: str) -> int:
    width = rows["activations"].shape[-1]
    if expected is not None and width != expected:
        raise ShardError(
            f"activations have width {width} but {holder} holds width {expected}: capture one site per {holder}"
        )
    return width


# ----------------------------------------------------------------------------- in memory


class ActivationBuffer:
    """Capture into memory, up to ``max_tokens`` vectors of width ``d`` (inferred if None).

    An append that does not fit is refused whole and nothing of it is kept, so
    the buffer only ever holds complete appends (whole samples)."""

    def __init__(self, max_tokens: int, d: Optional[int] = None):
        if max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens}: a capture buffer must hold at least one vector")
        self.max_tokens = int(max_tokens)
        self.d = d
        self.n_tokens = 0
        self._chunks: list[Rows] = []

    def __len__(self) -> int:
        return self.n_tokens

    def append(self, acts: Tensor, sample_id: Union[int, Tensor], token: Optional[Tensor], timestep: Union[float, Tensor]) -> None:
        """Add vectors ``(..., d)`` with their provenance (see :class:`ShardWriter.add`)."""
        rows = _rows(acts, sample_id, token, timestep)
        width = _check_width(self.d, rows, "capture buffer")
        if self.n_tokens + _n(rows) > self.max_tokens:
            raise ShardError(
                f"capture buffer is full at {self.n_tokens} vectors: raise max_tokens, subsample tokens, or write "
                f"shards to disk (the {_n(rows)} vectors of this call were not kept)"
            )
        self.d = width
        self._chunks.append(rows)
        self.n_tokens += _n(rows)

    def tensors(self) -> Rows:
        """Everything captured: ``activations (N, d)``, ``sample_id``, ``token`` (int64), ``timestep`` (float32)."""
        if not self._chunks:
            return {
                "activations": torch.zeros(0, self.d or 0),
                "sample_id": torch.zeros(0, dtype=torch.int64),
                "token": torch.zeros(0, dtype=torch.int64),
                "timestep": torch.zeros(0),
            }
        return _cat(self._chunks)


# ----------------------------------------------------------------------------- on disk: layout


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _damaged(path: Path, why: Any) -> ShardError:
    return ShardError(f"{path}: activation shard is truncated or damaged ({_one_line(why)}); delete it and run "
                      "capture again")


def _checksum(rows: Rows) -> str:
    """CRC-32 of the bytes of a shard's tensors, in a fixed order: a flipped bit in the data is found on reading
    (about 4 GB/s, little next to reading the shard)."""
    crc = 0
    for name in ("activations", *PROVENANCE):
        crc = zlib.crc32(rows[name].contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def _parse_site(data: Any) -> Site:
    """A site from its JSON form; a ValueError says what is malformed (callers name the file and the fix)."""
    if not isinstance(data, dict):
        raise ValueError(f"the site is {type(data).__name__}, not a JSON object")
    try:
        return Site.from_dict(data)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"the site is malformed ({_one_line(err)})") from err


def _shard_paths(directory: Path) -> list[Path]:
    """``shard_*.safetensors`` files in index order (temp files and others ignored)."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _SHARD_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """A safetensors file's metadata and each tensor's (dtype, shape), from its header alone."""
    if not path.is_file():  # a folder or a pipe is no shard (and opening a pipe would wait forever)
        raise _damaged(path, "not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in f.keys()}
    except Exception as err:  # safetensors reports truncation and garbage as various errors
        raise _damaged(path, err) from err
    return meta, tensors


def _check_tensors(path: Path, tensors: Mapping[str, tuple[str, list[int]]], dtype: str) -> tuple[int, int]:
    """``(rows, width)`` of a shard whose tensors have the names, dtypes and shapes of the layout."""
    expected = {"activations": (_STORED_AS[dtype], 2), **{p: (_PROVENANCE_STORED_AS[p], 1) for p in PROVENANCE}}
    for name, (stored_as, rank) in expected.items():
        if name not in tensors:
            raise _damaged(path, f"it has no tensor '{name}'")
        got, shape = tensors[name]
        if got != stored_as or len(shape) != rank:
            raise _damaged(path, f"tensor '{name}' is {got} shaped {shape}, not {stored_as} of rank {rank}")
    rows, width = tensors["activations"][1]
    for name in PROVENANCE:
        if tensors[name][1] != [rows]:
            raise _damaged(path, f"tensor '{name}' holds {tensors[name][1][0]} entries for {rows} vectors")
    return rows, width


def _shard_header(path: Path) -> dict[str, Any]:
    """The manifest entry of one shard (file, tokens, d, dtype, site, max_sample_id), from its header alone
    (cheap; detects truncation, garbage and tensors of another name, dtype or shape)."""
    meta, tensors = _read_header(path)
    if meta.get("format") != FORMAT:
        raise _damaged(path, f"not a '{FORMAT}' file")
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise _damaged(path, f"its header states dtype {dtype!r}, not one of {', '.join(DTYPES)}")
    rows, width = _check_tensors(path, tensors, dtype)
    try:
        site = _parse_site(json.loads(meta["site"]))
        max_sample_id = int(meta["max_sample_id"])
    except KeyError as err:
        raise _damaged(path, f"its header has no {err}") from err
    except (ValueError, RecursionError) as err:
        raise _damaged(path, f"a header field is malformed: {err}") from err
    return {"file": path.name, "tokens": rows, "d": width, "dtype": dtype, "site": site,
            "max_sample_id": max_sample_id}


def _remove_stray_temps(directory: Path) -> None:
    """Temp files of writes that were killed half-way: ours (see :func:`sae_core.atomic.atomic_write`) and the
    one safetensors itself writes before renaming it over ours (``.tmp`` and six characters)."""
    for pattern in (".shard_*.tmp", f".{MANIFEST}.*.tmp", ".tmp??????"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ShardError(f"shards are stored as {', '.join(DTYPES)}, not {dtype}")


# ----------------------------------------------------------------------------- on disk: writing


class ShardWriter:
    """Write activations of one site to ``directory`` as shards of ``shard_tokens`` vectors.

    ``dtype``: float16 (default, half the disk; values beyond +-65504 are refused),
    bfloat16 or float32. ``extra``: JSON-able facts stored in the manifest (e.g.
    prompts), merged over those of an earlier session. ``whole_adds``: a shard ends
    only between two :meth:`add` calls (it may then exceed ``shard_tokens``), so a
    capture that adds one whole sample per call never leaves part of a sample on
    disk when it is killed. Reopening a directory
    appends to it; it must hold the same site, width and dtype. Use it as a
    context manager or call :meth:`close` to flush the last, partial shard.
    """

    def __init__(
        self,
        directory: Union[str, Path],
        site: Site,
        shard_tokens: int = 65536,
        dtype: torch.dtype = torch.float16,
        extra: Optional[Mapping[str, Any]] = None,
        whole_adds: bool = False,
    ):
        if shard_tokens < 1:
            raise ConfigError(f"shard_tokens={shard_tokens}: a shard must hold at least one vector")
        self.directory = Path(directory)
        self.site = Site.from_dict(site.to_dict())
        self.shard_tokens = int(shard_tokens)
        self.whole_adds = whole_adds
        self.dtype = dtype
        self._dtype_name = _dtype_name(dtype)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(f"could not create the shard directory {self.directory} ({_one_line(err)}): choose "
                             "another folder") from err
        _remove_stray_temps(self.directory)
        self._shards = [_shard_header(p) for p in _shard_paths(self.directory)]
        self.d = self._check_existing()
        previous = self._previous_extra()
        self._check_same_capture(previous.get("capture"), dict(extra or {}).get("capture"))
        self.extra = {**previous, **dict(extra or {})}
        try:
            json.dumps(self.extra)
        except TypeError as err:
            raise ShardError(f"extra manifest data must be JSON-able ({err}): pass strings, numbers, lists, dicts") from err
        self._max_sample_id = max((s["max_sample_id"] for s in self._shards), default=-1)
        self._pending: list[Rows] = []
        self._pending_tokens = 0
        self._closed = False
        if self._shards:
            self._write_manifest()  # a kill between a shard and its manifest update left it one behind

    def _check_existing(self) -> Optional[int]:
        for shard in self._shards:
            where = self.directory / shard["file"]
            if shard["site"] != self.site:
                raise ShardError(
                    f"{where} holds activations of site {shard['site']}, not {self.site}: "
                    "capture each site into its own directory"
                )
            if shard["dtype"] != self._dtype_name:
                raise ShardError(f"{where} is stored as {shard['dtype']}, not {self._dtype_name}: reopen with the same dtype")
            if shard["d"] != self._shards[0]["d"]:
                raise ShardError(f"{where} has width {shard['d']}, other shards {self._shards[0]['d']}: delete the odd shard")
        return self._shards[0]["d"] if self._shards else None

    def _check_same_capture(self, previous: Any, settings: Any) -> None:
        """Shards already captured with other ``capture`` settings are refused: the data would be mixed (a
        resume must use the same settings; any front end that records its settings gets this check)."""
        if not self._shards or not isinstance(previous, dict) or not isinstance(settings, dict) or previous == settings:
            return
        changed = sorted(k for k in {**previous, **settings} if previous.get(k) != settings.get(k))
        raise ConfigError(f"{self.directory} holds a capture made with other settings ({', '.join(changed)} differ): "
                          "rerun with the same options to resume it, or capture into a new folder")

    def _previous_extra(self) -> dict[str, Any]:
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text())
        except (OSError, ValueError, RecursionError):
            return {}  # no or damaged manifest: it is rebuilt from the shards
        extra = manifest.get("extra") if isinstance(manifest, dict) else None
        return dict(extra) if isinstance(extra, dict) else {}

    @property
    def n_tokens(self) -> int:
        """Vectors written to shards plus those waiting for the next shard."""
        return sum(s["tokens"] for s in self._shards) + self._pending_tokens

    @property
    def next_sample_id(self) -> int:
        """One past the largest sample id written or pending: where a resumed capture continues."""
        return self._max_sample_id + 1

    def add(self, acts: Tensor, sample_id: Union[int, Tensor], token: Optional[Tensor], timestep: Union[float, Tensor]) -> None:
        """Queue vectors ``(..., d)``; every ``shard_tokens`` of them become a shard.

        ``sample_id`` (int64), ``token`` (int64; None numbers the tokens along the
        last leading axis) and ``timestep`` (the sigma) are one per vector or one
        for all (broadcast to ``acts.shape[:-1]``)."""
        if self._closed:
            raise ShardError(f"the shard writer for {self.directory} is closed: open a new ShardWriter to append")
        rows = _rows(acts, sample_id, token, timestep)
        self.d = _check_width(self.d, rows, f"shard directory {self.directory}")
        rows["activations"] = self._to_storage(rows["activations"])
        if _n(rows) == 0:
            return
        self._pending.append(rows)
        self._pending_tokens += _n(rows)
        self._max_sample_id = max(self._max_sample_id, int(rows["sample_id"].max()))
        while self._pending_tokens >= self.shard_tokens:
            self._flush(self._pending_tokens if self.whole_adds else self.shard_tokens)

    def _to_storage(self, acts: Tensor) -> Tensor:
        if self.dtype == torch.float16 and acts.numel():
            peak = float(acts.abs().max())
            if peak > _FLOAT16_MAX:
                raise ShardError(
                    f"activations reach {peak:.4g}, beyond float16's range (65504): "
                    "capture with dtype=torch.bfloat16 or torch.float32"
                )
        return acts.to(self.dtype)

    def _flush(self, n: int) -> None:
        """Write the first ``n`` pending vectors as the next shard; on failure nothing changes."""
        pending = _cat(self._pending)
        shard, rest = _take(pending, slice(0, n)), _take(pending, slice(n, None))
        index = int(_SHARD_NAME.match(self._shards[-1]["file"]).group(1)) + 1 if self._shards else 0
        path = self.directory / f"shard_{index:05d}.safetensors"
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "site": json.dumps(self.site.to_dict()),
            "dtype": self._dtype_name,
            "max_sample_id": int(shard["sample_id"].max()),
            CHECKSUM: _checksum(shard),
        }
        save_safetensors_atomic(path, shard, meta)
        self._shards.append({
            "file": path.name, "tokens": n, "d": self.d, "dtype": self._dtype_name,
            "site": self.site, "max_sample_id": meta["max_sample_id"],
        })
        self._pending = [rest] if _n(rest) else []
        self._pending_tokens = _n(rest)
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "site": self.site.to_dict(),
            "d": self.d,
            "dtype": self._dtype_name,
            "n_tokens": sum(s["tokens"] for s in self._shards),
            "shards": [{"file": s["file"], "tokens": s["tokens"]} for s in self._shards],
            "extra": self.extra,
        }
        text = json.dumps(manifest, indent=1)
        atomic_write(self.directory / MANIFEST, lambda tmp: Path(tmp).write_text(text))

    def close(self) -> None:
        """Flush the remaining vectors as a last, smaller shard and write the manifest."""
        if self._closed:
            return
        if self._pending_tokens:
            self._flush(self._pending_tokens)
        self._write_manifest()
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()  # what was captured is valid even if the capture loop failed


# ----------------------------------------------------------------------------- on disk: reading


def _read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of ``directory``, checked against its shards' headers (see the module docstring)."""
    if not directory.is_dir():
        raise ShardError(f"activation directory {directory} does not exist: run capture first or check the path")
    path = directory / MANIFEST
    if not path.exists():
        if _shard_paths(directory):
            raise ShardError(f"{directory} has shards but no {MANIFEST}: {_REBUILD}")
        raise ShardError(f"no activation shards in {directory}: run capture first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ShardError(f"{path} is damaged ({_one_line(err) or type(err).__name__}): {_REBUILD}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path} is not a '{FORMAT}' manifest: point at a directory written by ShardWriter")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path} has shard format version {_short(manifest.get('version'))}; this engine reads "
                         f"{VERSION!r}: update it")
    return _ManifestCheck(directory, path).run(manifest)


def _is_count(value: Any) -> bool:
    """A JSON integer >= 0 (not a bool, a float or a string of digits)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any) -> str:
    """A manifest value as a message may quote it: one line, bounded."""
    text = _one_line(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


class _ManifestCheck:
    """Checks one manifest: its fields' types, its entries' files, and each entry against its shard's header."""

    def __init__(self, directory: Path, path: Path):
        self.directory, self.path = directory, path

    def lie(self, what: str) -> ShardError:
        return ShardError(f"{self.path}: {what}; {_REBUILD}")

    def run(self, manifest: dict[str, Any]) -> dict[str, Any]:
        n_tokens, entries = manifest.get("n_tokens"), manifest.get("shards")
        if not _is_count(n_tokens):
            raise self.lie(f"'n_tokens' is {_short(n_tokens)}, not a count of vectors")
        if not isinstance(entries, list):
            raise self.lie(f"'shards' is {_short(entries)}, not a list of shard entries")
        if n_tokens == 0 and not entries:
            raise ShardError(f"{self.directory} holds no activation vectors: run capture again (it wrote none)")
        d, dtype, extra = manifest.get("d"), manifest.get("dtype"), manifest.get("extra")
        if not _is_count(d) or d == 0:
            raise self.lie(f"'d' is {_short(d)}, not a vector width")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self.lie(f"'dtype' is {_short(dtype)}, not one of {', '.join(DTYPES)}")
        if extra is not None and not isinstance(extra, dict):
            raise self.lie(f"'extra' is {_short(extra)}, not a JSON object")
        try:
            site = _parse_site(manifest.get("site"))
        except ValueError as err:
            raise self.lie(str(err)) from err
        shards = self.entries(entries)
        listed = sum(entry["tokens"] for entry in shards)
        if listed != n_tokens:
            raise self.lie(f"'n_tokens' is {n_tokens} but its shards list {listed} vectors")
        for entry in shards:
            self.against_header(entry, d, dtype, site)
        return {**manifest, "site": site.to_dict(), "shards": shards}

    def entries(self, entries: list[Any]) -> list[dict[str, Any]]:
        """Each entry as ``{"file", "tokens"}``: a bare name of a distinct regular file in the directory."""
        seen: dict[Path, int] = {}
        shards = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise self.lie(f"shard entry {index} is {_short(entry)}, not an object with 'file' and 'tokens'")
            name, tokens = entry.get("file"), entry.get("tokens")
            if not _is_count(tokens):
                raise self.lie(f"shard entry {index} has 'tokens' {_short(tokens)}, not a count of vectors")
            resolved = self.inside(index, name)
            if resolved in seen:
                raise self.lie(f"shard entry {index} ({_short(name)}) is the file of entry {seen[resolved]} again: "
                               "each shard may be listed once")
            seen[resolved] = index
            shards.append({"file": name, "tokens": tokens})
        return shards

    def inside(self, index: int, name: Any) -> Path:
        """The real path of the file ``name`` names, which must lie directly inside the directory."""
        escapes = self.lie(f"shard entry {index} names {_short(name)}, which is not a file directly inside "
                           f"{self.directory} (a manifest lists its own folder's shards by bare file name)")
        plain = isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
        if not plain or PurePosixPath(name).name != name or PureWindowsPath(name).name != name:
            raise escapes
        try:
            resolved = (self.directory / name).resolve(strict=True)
        except FileNotFoundError as err:
            raise ShardError(f"{self.directory / name} is listed in {MANIFEST} but missing: {_REBUILD}, or run "
                             "capture again") from err
        except (OSError, RuntimeError) as err:  # a link loop, a name too long
            raise escapes from err
        if resolved.parent != self.directory.resolve():
            raise escapes  # a link that leads out of the folder
        return resolved

    def against_header(self, entry: dict[str, Any], d: int, dtype: str, site: Site) -> None:
        """The entry, and the manifest's width, dtype and site, are what the shard's own header says."""
        header = _shard_header(self.directory / entry["file"])
        name = entry["file"]
        if header["tokens"] != entry["tokens"]:
            raise self.lie(f"it lists {name} with {entry['tokens']} vectors, but the shard holds {header['tokens']}")
        if header["d"] != d or header["dtype"] != dtype:
            raise self.lie(f"it states {dtype} vectors of width {d}, but {name} holds {header['dtype']} vectors of "
                           f"width {header['d']}")
        if header["site"] != site:
            raise self.lie(f"it states site {site}, but {name} holds site {header['site']} (keep each site's shards "
                           "in their own folder)")


def _pass_seed(seed: int, index: int, rank: int) -> int:
    """The random seed of pass ``index`` of ``rank``: distinct per rank, and rank 0's is
    that of a single reader (so one process reads as it always did)."""
    base = seed * 1_000_003 + index
    if rank == 0:
        return base
    return (base + rank * 0x9E3779B97F4A7C15) % 2**64  # golden-ratio stride: ranks far apart


class ShardReader:
    """Batches ``{"activations", "sample_id", "token", "timestep"}`` from a shard directory.

    Re-iterable: each ``iter()`` starts the reader's next pass (0, 1, 2...), and
    pass ``i`` depends only on ``(seed, i, rank)`` (see :meth:`iter_pass`), so a
    fresh reader replays a training run's data exactly. ``shuffle``: random shard
    order and a rolling shuffle buffer of ``buffer_tokens`` vectors; otherwise
    shard order and token order as written. ``drop_last`` (default True) skips
    the final partial batch of a pass, as equal batch sizes keep training
    losses comparable; pass False to read every vector. Activations keep their
    stored dtype.

    ``rank`` / ``world_size``: data-parallel reading. Process ``rank`` reads the
    shards whose position in the manifest is ``rank`` modulo ``world_size``, so
    processes see disjoint data, and shuffles them with its own random stream
    (rank 0 shuffles exactly as a single reader with the same seed).
    :attr:`n_tokens` is this process's share, :attr:`total_tokens` the
    directory's. A directory needs at least ``world_size`` shards.
    """

    def __init__(
        self,
        directory: Union[str, Path],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        buffer_tokens: int = 262144,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: a batch needs at least one vector")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank}, world_size={world_size}: a rank counts from 0 to world_size - 1")
        self.directory = Path(directory)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.buffer_tokens = int(buffer_tokens)
        self.drop_last = drop_last
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._manifest = _read_manifest(self.directory)
        n_shards = len(self._manifest["shards"])
        if n_shards < self.world_size:
            raise ShardError(
                f"{self.directory} holds {n_shards} shard{'s' if n_shards != 1 else ''}, fewer than the "
                f"{self.world_size} processes reading it (each reads whole shards): capture with a smaller shard "
                "size (--shard-tokens) or use fewer processes"
            )
        self._shards = self._manifest["shards"][self.rank::self.world_size]
        if drop_last and self.n_tokens < self.batch_size:
            where = f" for rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
            raise ShardError(
                f"{self.directory} holds {self.n_tokens} vectors{where}, fewer than one batch of {self.batch_size}: "
                "lower batch_size or capture more"
            )
        self._passes = 0

    @property
    def d(self) -> int:
        return int(self._manifest["d"])

    @property
    def site(self) -> Site:
        return Site.from_dict(self._manifest["site"])

    @property
    def n_tokens(self) -> int:
        """Vectors this reader reads per pass (this rank's share of the directory)."""
        return sum(int(s["tokens"]) for s in self._shards)

    @property
    def total_tokens(self) -> int:
        """Vectors in the whole directory, over all ranks."""
        return int(self._manifest["n_tokens"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self._manifest["dtype"]]

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self._manifest.get("extra") or {})

    def __iter__(self) -> Iterator[Rows]:
        index = self._passes
        self._passes += 1
        return self.iter_pass(index)

    def iter_pass(self, index: int) -> Iterator[Rows]:
        """Pass ``index`` over this rank's data, the same every time it is asked for."""
        gen = torch.Generator().manual_seed(_pass_seed(self.seed, index, self.rank))
        shards = self._shards
        order = torch.randperm(len(shards), generator=gen).tolist() if self.shuffle else range(len(shards))
        capacity = max(self.buffer_tokens, self.batch_size)
        pool: Optional[Rows] = None
        for i in order:
            shard = self._load(shards[i])
            pool = shard if pool is None else _cat([pool, shard])
            if _n(pool) >= capacity:
                keep = min(capacity // 2, _n(pool) - self.batch_size)  # mix half into later shards
                n_batches = (_n(pool) - keep) // self.batch_size
                batches, pool = self._split(pool, n_batches, gen)
                yield from batches
        if pool is not None:
            batches, rest = self._split(pool, _n(pool) // self.batch_size, gen)
            yield from batches
            if _n(rest) and not self.drop_last:
                yield rest

    def _split(self, pool: Rows, n_batches: int, gen: torch.Generator) -> tuple[list[Rows], Rows]:
        """``n_batches`` batches drawn from ``pool`` (at random when shuffling) and what is left."""
        order = torch.randperm(_n(pool), generator=gen) if self.shuffle else torch.arange(_n(pool))
        size = self.batch_size
        batches = [_take(pool, order[j * size:(j + 1) * size]) for j in range(n_batches)]
        return batches, _take(pool, order[n_batches * size:])

    def _load(self, entry: Mapping[str, Any]) -> Rows:
        """A shard's rows, as its manifest entry and header promise, and as its checksum says they were written."""
        path = self.directory / entry["file"]
        if not path.exists():
            raise ShardError(f"{path} is listed in {MANIFEST} but missing: {_REBUILD}, or run capture again")
        if not path.is_file():
            raise _damaged(path, "not a regular file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                rows = {name: f.get_tensor(name) for name in ("activations", *PROVENANCE)}
        except Exception as err:  # truncation, garbage, missing tensors: all mean "re-capture this shard"
            raise _damaged(path, err) from err
        n = int(entry["tokens"])
        if rows["activations"].shape != (n, self.d) or any(rows[p].shape != (n,) for p in PROVENANCE):
            raise _damaged(path, f"expected {n} vectors of width {self.d}")
        if rows["activations"].dtype != self.dtype:
            raise _damaged(path, f"its activations are {rows['activations'].dtype}, not {self.dtype}")
        if CHECKSUM in meta and meta[CHECKSUM] != _checksum(rows):
            raise _damaged(path, "its data does not match the checksum in its header")
        return rows
