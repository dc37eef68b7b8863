"""Options from a TOML or JSON file, overridden by flags on the command line.

A config file holds any option of a subcommand by its flag name (``batch-size`` or ``batch_size``),
either at the top level (shared by every subcommand that has the option) or in a table named after the
subcommand (``[train]``), which wins. Flags given on the command line win over both. An option the
subcommand does not have is an error naming the ones it has, so a typo never passes silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from sae_core import ConfigError


def read_config(path: Path) -> dict[str, Any]:
    """The file's mapping; TOML by default, JSON for ``.json``."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except ValueError as err:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of options, not {type(data).__name__}")
    return data


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


def _convert(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """A config value as the flag would have parsed it (types and choices checked the same way)."""
    def one(v: Any) -> Any:
        if action.type is not None and not isinstance(v, bool):
            try:
                if action.type is int and isinstance(v, float) and not v.is_integer():
                    raise ValueError("expected a whole number")
                v = action.type(v)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ConfigError(f"{path}: option {key!r} = {v!r}: {err}") from err
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"{path}: option {key!r} = {v!r} is not one of {', '.join(map(str, action.choices))}")
        return v

    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        return [one(v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and not isinstance(value, bool):
        raise ConfigError(f"{path}: option {key!r} is a switch: set it to true or false, not {value!r}")
    return one(value)


def parse_with_config(parser: argparse.ArgumentParser, subparsers: dict[str, argparse.ArgumentParser],
                      argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``argv``; when it has ``--config FILE``, the file's options become the subcommand's defaults."""
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if path is None:
        return args
    data = read_config(Path(path))
    sub = subparsers[args.command]
    options = _options(sub)
    table = data.get(args.command, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{args.command}] must be a table of options")
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    merged.update(table)
    defaults = {}
    for key, value in merged.items():
        dest = key.replace("-", "_")
        if dest not in options:
            if key in table:
                raise ConfigError(f"{path}: `{args.command}` has no option {key!r}; it has: "
                                      + ", ".join(sorted(o.replace('_', '-') for o in options)))
            continue  # a top-level option for other subcommands
        defaults[dest] = _convert(options[dest], key, value, Path(path))
    sub.set_defaults(**defaults)
    for action in sub._actions:
        if action.dest in defaults:
            action.required = False  # a required flag may come from the file
    return parser.parse_args(argv)
