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
    if not path.is_file():
        raise InputError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise InputError(f"config file {str(path)!r} cannot be parsed: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"config file {str(path)!r} should hold a mapping, got {type(data).__name__}")
    return data


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
