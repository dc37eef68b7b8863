"""Atomic file writes: a file is either the old version or the complete new one.

Everything the engine writes (dictionaries, checkpoints, activation shards)
goes through :func:`atomic_write`: write to a temporary file in the same
directory, flush it to disk, then ``os.replace`` it over the target. A kill or
a full disk part-way leaves the previous file untouched and no stray temp file.
A write that fails (full disk, no permission) is a :class:`WriteError`, also
when safetensors reports it as its own error rather than an ``OSError``.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from .errors import WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one step."""
    path = Path(path)
    try:  # a folder that cannot be made (a file in the way, no permission) fails like the write itself
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; the result should read like any other
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        raise _write_error(path, err) from err
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def _write_error(path: Path, err: OSError) -> WriteError:
    """One line for the user: a full disk says so (it is the common case and the fix differs)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(f"disk full while writing {path}: free some space and retry (the previous file, if any, is intact)")
    return WriteError(f"could not write {path}: {err.strerror or err}")


def save_safetensors_atomic(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> Path:
    """``safetensors`` save through :func:`atomic_write`; metadata values become strings."""
    blobs = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: _save_file(blobs, tmp, meta))


_OS_ERROR_CODE = re.compile(r"(?:os error|code:) ?(\d+)")
"""The errno in safetensors' I/O messages: "... (os error 28)" (0.5 on) or "Os { code: 28, ... }" (before)."""


def _save_file(blobs: Mapping[str, Tensor], tmp: str, meta: Mapping[str, str]) -> None:
    """``save_file``, whose failed writes (a full disk included) are raised as ``SafetensorError``, with the
    errno only in the text: turn those into the ``OSError`` they are, so that :func:`atomic_write` reports them."""
    try:
        save_file(blobs, tmp, metadata=meta)
    except SafetensorError as err:
        found = _OS_ERROR_CODE.search(str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from err


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
