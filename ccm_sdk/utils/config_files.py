"""Config files and dotted overrides: one YAML/JSON mapping per file, ``key.sub=value`` settings on top.

Training configs, eval configs and world build presets are all read with :func:`read_config_file`;
overrides from the command line (``train.lr=1e-4``, ``--set vae.seed=3``) parse their values with
:func:`parse_value` and land with :func:`set_path`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InputError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON (.json) file holding one mapping."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"config file {str(path)!r} is a directory, expected a YAML or JSON file")
    if not path.is_file():
        raise InputError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                         "expected a YAML or JSON file") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise InputError(f"config file {str(path)!r} cannot be parsed: {_one_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"config file {str(path)!r} should hold a mapping, got {type(data).__name__}")
    return data


def _one_line(exc: Exception) -> str:
    """A parser's error on one line: YAML's spans several, with a caret under the place."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:  # yaml.MarkedYAMLError
        what = " ".join(filter(None, (getattr(exc, "context", None), getattr(exc, "problem", None))))
        return f"{what} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``raw[path[0]][path[1]]... = value``, creating mappings (and indexing lists) on the way."""
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            index = int(part)
            if index > len(node):
                raise InputError(f"cannot set {'.'.join(path)}: the list has {len(node)} entries")
            if index == len(node):
                node.append([] if path[i + 1].isdigit() else {})
            node = node[index]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = [] if path[i + 1].isdigit() else {}
            node[part] = nxt
        elif not isinstance(nxt, (dict, list)):
            raise InputError(f"cannot set {'.'.join(path)}: {'.'.join(path[: i + 1])} is {nxt!r}, not a section")
        node = nxt
    last = path[-1]
    if isinstance(node, list):
        index = int(last)
        if index > len(node):
            raise InputError(f"cannot set {'.'.join(path)}: the list has {len(node)} entries")
        if index == len(node):
            node.append(value)
        else:
            node[index] = value
    else:
        node[last] = value


def parse_value(text: str) -> Any:
    """Override values parse as JSON when they can (numbers, true/false/null, lists), else stay strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: Iterable[str], *, option: str = "--set") -> list[tuple[str, Any]]:
    """``KEY=VALUE`` strings as ``(key, value)`` pairs, values parsed with :func:`parse_value`."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{option} expects KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), parse_value(value)))
    return pairs
