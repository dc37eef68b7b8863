"""Reading a prompts file: one prompt per line, and a clear verdict on lines that are not prompts.

Blank lines and lines starting with ``#`` are skipped. A file that is not UTF-8 text (a binary file,
an image passed by mistake) or has control characters in a line is refused with the line numbers,
since a garbled prompt would silently produce garbage activations. Lines with no letter or digit are
skipped with a warning. A file with no prompt left is an error.
"""
from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

from sae_core import InputError

log = logging.getLogger("training.prompts")
MAX_CHARS = 2000


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        if not path.exists():
            raise InputError(f"prompts file {path} does not exist")
        raise InputError(f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}: pass a prompts file "
                         "(one prompt per line, UTF-8 text)")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise InputError(f"{path} is a binary file, not a prompts file (one prompt per line, UTF-8 text)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise InputError(f"{path} is not UTF-8 text (line {line}): save it as UTF-8, one prompt per line") from err
    prompts, bad, skipped = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(unicodedata.category(c) == "Cc" for c in line):
            bad.append(number)
        elif len(line) > MAX_CHARS:
            raise InputError(f"{path}: line {number} has {len(line)} characters; is it one prompt per line?")
        elif not any(c.isalnum() for c in line):
            skipped.append(number)
        else:
            prompts.append(line)
    if bad:
        raise InputError(f"{path}: control characters in line(s) {', '.join(map(str, bad[:10]))}"
                              f"{' ...' if len(bad) > 10 else ''}: remove them")
    if skipped:
        log.warning("%s: skipped %d line(s) with no letters or digits: %s", path, len(skipped), ", ".join(map(str, skipped[:10])))
    if not prompts:
        raise InputError(f"{path} holds no prompts (one per line; blank lines and # comments are skipped)")
    return prompts
