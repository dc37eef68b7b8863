"""Options of ``python -m training``: the type and range of each value, and config files that set them.

Every option's argparse ``type`` is one of the checkers here (:class:`Number`, :class:`Text`, :class:`Device`,
:class:`OutputPath`, :class:`Span`). Each reads a flag's text (``__call__``) and a config file's value
(``from_file``, which wants the file's own type: a number, not a string of one) and refuses a wrong value
with what is wrong, so that both routes share one check and a bad value is refused while parsing, before
any model is loaded.

A config file holds any option of a subcommand by its flag name (``batch-size`` or ``batch_size``),
either at the top level (shared by every subcommand that has the option) or in a table named after the
subcommand (``[train]``), which wins. Flags given on the command line win over both. An option no
subcommand has, an option the table's subcommand does not have, and a table named after no subcommand are
errors naming what exists, so a typo never passes silently.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from sae_core import ConfigError, ScheduleError, validate_window
from sae_core.config import INT_MAX


def _describe(value: Any) -> str:
    """A config value's kind as its file calls it, for messages."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value!r}"


class ArgParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are ConfigErrors: the command line prints them as one line, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


@dataclass(frozen=True)
class Number:
    """A whole (``kind=int``) or finite real (``kind=float``) number within bounds; ``*_open``: the bound itself
    is excluded."""

    kind: type = int
    min: Optional[float] = None
    max: Optional[float] = None
    min_open: bool = False
    max_open: bool = False

    def __call__(self, text: str) -> Any:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a {self._name()}") from None
        return self._bounded(value)

    def from_file(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise argparse.ArgumentTypeError(f"must be a {self._name()}, not {_describe(value)}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise argparse.ArgumentTypeError(f"must be a whole number, not {value!r}")
            return self._bounded(int(value))
        try:
            return self._bounded(float(value))
        except OverflowError:
            raise argparse.ArgumentTypeError(f"must be a finite number, not {_short(value)}") from None

    def _name(self) -> str:
        return "whole number" if self.kind is int else "number"

    def _bounded(self, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {value}")
        high = INT_MAX if self.kind is int and self.max is None else self.max
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            raise argparse.ArgumentTypeError(f"must be {'above' if self.min_open else 'at least'} {_show(self.min)}, "
                                             f"not {_show(value)}")
        if high is not None and (value >= high if self.max_open else value > high):
            raise argparse.ArgumentTypeError(f"must be {'below' if self.max_open else 'at most'} {_show(high)}, "
                                             f"not {_show(value)}")
        return value


def _show(number: float) -> str:
    """A number as a message shows it: whole numbers in full (up to 24 digits), others short (0.001, 1e+30)."""
    if isinstance(number, int):
        text = str(number)
        return text if len(text) <= 24 else f"{text[:6]}... ({len(text)} digits)"
    return str(int(number)) if number.is_integer() and abs(number) < 1e21 else f"{number:g}"


COUNT = Number(int, min=1)
"""How many of something: 0 or fewer makes no run."""
FEATURE = Number(int, min=0)
"""A dictionary feature's id: 0 up to (checked once the dictionary is read) its width - 1."""
SEED = Number(int, min=0)
FRACTION = Number(float, min=0.0, max=1.0)
"""Sampling progress: 0 = the first step, 1 = the last."""
FINITE = Number(float)
"""Any real number; NaN and inf are never a setting."""
NON_NEGATIVE = Number(float, min=0.0)
POSITIVE = Number(float, min=0.0, min_open=True)


@dataclass(frozen=True)
class Text:
    """A string without control characters; ``empty``: the empty string is allowed (e.g. "no prompt")."""

    empty: bool = False

    def __call__(self, text: Any) -> str:
        if not isinstance(text, str):
            raise argparse.ArgumentTypeError(f"must be a string, not {_describe(text)}")
        if not self.empty and not text.strip():
            raise argparse.ArgumentTypeError("must not be empty")
        if any(unicodedata.category(c) == "Cc" for c in text):
            raise argparse.ArgumentTypeError(f"{text[:80]!r} holds control characters: remove them")
        return text

    def from_file(self, value: Any) -> str:
        return self(value)


TEXT = Text()


@dataclass(frozen=True)
class Device:
    """A torch device that this machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""

    def __call__(self, text: Any) -> str:
        text = TEXT(text)
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
        problem = _missing_device(device)
        if problem:
            raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
        return text

    def from_file(self, value: Any) -> str:
        return self(value)


def _missing_device(device: torch.device) -> Optional[str]:
    """Why this machine cannot run on ``device``, or None when it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"this machine has no CUDA device (torch {torch.__version__}): use --device cpu"
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device(s), numbered from 0: use cuda:0 .. cuda:{count - 1}"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "this machine has no Apple GPU (MPS): use --device cpu"
    return "not a device this trainer runs on: use cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class OutputPath:
    """Where a command writes: a folder, or a file whose suffix says its format (one of ``suffixes``).

    The value is checked here; :func:`check_writable` checks the disk once parsing is done."""

    folder: bool = True
    suffixes: tuple[str, ...] = ()

    def __call__(self, text: Any) -> str:
        text = TEXT(text)
        if self.suffixes and Path(text).suffix.lower() not in self.suffixes:
            raise argparse.ArgumentTypeError(f"{text!r} cannot be written as asked: the file name must end in "
                                             + " or ".join(self.suffixes))
        return text

    def from_file(self, value: Any) -> str:
        return self(value)


def check_writable(value: str, folder: bool) -> None:
    """Refuse an output that cannot be written: a file where a folder is meant (or the other way round), or a
    place below a file or in a folder without write permission."""
    path = Path(os.path.expanduser(value))
    if path.exists() and path.is_dir() != folder:
        wanted = "folder" if folder else "file"
        raise ConfigError(f"{value} is {'a file' if folder else 'a folder'}: name a {wanted} to write to")
    above = path if path.is_dir() else path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"cannot write {value}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {value}: no permission to write in {above}")


@dataclass(frozen=True)
class Span:
    """A sampling-progress window ``START-END`` within 0..1 (e.g. ``0-0.3``), or ``all`` (None)."""

    def __call__(self, text: Any) -> Optional[tuple[float, float]]:
        text = TEXT(text)
        if text == "all":
            return None
        start, _, end = text.partition("-")
        try:
            window = (FRACTION(start), FRACTION(end))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"a window is START-END in sampling progress 0..1 (e.g. 0-0.5) or 'all', "
                                             f"not {text[:80]!r}") from None
        try:
            return validate_window(window)
        except ScheduleError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    def from_file(self, value: Any) -> Optional[tuple[float, float]]:
        if not isinstance(value, str):
            raise argparse.ArgumentTypeError(f"must be a string START-END or 'all', not {_describe(value)}")
        return self(value)


# ----------------------------------------------------------------------------- config files


def read_config(path: Path) -> dict[str, Any]:
    """The file's mapping; TOML by default, JSON for ``.json``."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ConfigError(f"config file {path} is {kind}: pass a TOML or JSON file")
    raw = path.read_bytes()
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is a binary file, not TOML or JSON text (UTF-8)") from None
    language = "JSON" if path.suffix.lower() == ".json" else "TOML"
    try:
        data = json.loads(text) if language == "JSON" else _toml().loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"config file {path} is not valid {language}: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of options, not {_describe(data)}")
    return data


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


def _convert(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """A config value as the flag would have parsed it: the same checks, on the file's own types."""
    def refuse(v: Any, problem: str) -> ConfigError:
        return ConfigError(f"{path}: option {key!r} = {_short(v)}: {problem}")

    def one(v: Any) -> Any:
        if action.type is not None:
            try:
                v = action.type.from_file(v)
            except argparse.ArgumentTypeError as err:
                raise refuse(v, str(err)) from None
        elif not isinstance(v, str):
            raise refuse(v, f"must be a string, not {_describe(v)}")
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"{path}: option {key!r} = {_short(v)} is not one of {', '.join(map(str, action.choices))}")
        return v

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise refuse(value, "is a switch: set it to true or false")
        return value
    if value is None and action.default is None:  # JSON null: the option's own "unset"
        return None
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        values = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise refuse(value, f"must be a list of {action.nargs} values")
        if action.nargs == "+" and not values:
            raise refuse(value, "must hold at least one value")
        return [one(v) for v in values]
    if isinstance(value, (list, dict)):
        raise refuse(value, f"must be one value, not {_describe(value)}")
    return one(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _file_defaults(path: Path, command: str, subparsers: dict[str, argparse.ArgumentParser]) -> dict[str, Any]:
    """The options ``path`` sets for ``command``, converted and checked; unknown names and tables refused."""
    data = read_config(path)
    known_anywhere = {dest for sub in subparsers.values() for dest in _options(sub)}
    for key, value in data.items():
        if isinstance(value, dict) and key not in subparsers:
            raise ConfigError(f"{path}: [{key}] is not a subcommand; tables are named after one of "
                              + ", ".join(subparsers))
        if not isinstance(value, dict) and key.replace("-", "_") not in known_anywhere:
            raise ConfigError(f"{path}: no subcommand has an option {key!r}; see python -m training COMMAND --help")
    table = data.get(command, {})
    options = _options(subparsers[command])
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    merged.update(table)
    defaults = {}
    for key, value in merged.items():
        dest = key.replace("-", "_")
        if dest not in options:
            if key in table:
                raise ConfigError(f"{path}: `{command}` has no option {key!r}; it has: "
                                  + ", ".join(sorted(o.replace('_', '-') for o in options)))
            continue  # a top-level option for other subcommands
        defaults[dest] = _convert(options[dest], key, value, path)
    return defaults


def parse_with_config(parser: argparse.ArgumentParser, subparsers: dict[str, argparse.ArgumentParser],
                      argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``argv``; when it has ``--config FILE``, the file's options become the subcommand's defaults."""
    required = [a for sub in subparsers.values() for a in sub._actions if a.required]
    for action in required:
        action.required = False  # a required flag may come from the file: checked on the second pass
    try:
        args = parser.parse_args(argv)
    finally:
        for action in required:
            action.required = True
    path = getattr(args, "config", None)
    if path is None:
        return parser.parse_args(argv)
    sub = subparsers[args.command]
    defaults = _file_defaults(Path(path), args.command, subparsers)
    sub.set_defaults(**defaults)
    for action in sub._actions:
        if defaults.get(action.dest) is not None:
            action.required = False  # given by the file (null leaves a required option missing)
    return parser.parse_args(argv)
