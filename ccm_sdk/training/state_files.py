"""Training state without pickle: a nested state (an optimizer's, LR scheduler's or grad scaler's
``state_dict()``, the RNG states) as a pair of files, ``<name>.safetensors`` for its tensors and
``<name>.json`` for everything around them.

The JSON holds the structure with each tensor replaced by ``{"__tensor__": key}``; tuples become
``{"__tuple__": [...]}`` and dicts whose keys are not all plain strings (an optimizer's ``state`` is
keyed by parameter index) ``{"__dict__": [[key, value], ...]}``. Floats keep every bit (Python writes
the shortest text that reads back as the same double; infinities and NaN as ``Infinity``/``NaN``) and
tensors keep dtype, shape and bytes, so a state read back equals the one written and resume stays
bit-identical. Reading runs no code: safetensors holds raw bytes and JSON holds data only.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CorruptCheckpointError, InputTypeError

TENSOR, TUPLE, DICT = "__tensor__", "__tuple__", "__dict__"
MARKERS = (TENSOR, TUPLE, DICT)
FORMAT = "ccm-state-1"


def state_file_names(name: str) -> tuple[str, str]:
    """The two files a state called ``name`` is stored in: (JSON, safetensors)."""
    return f"{name}.json", f"{name}.safetensors"


# --- encoding --------------------------------------------------------------------------


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` as (JSON-serialisable structure, tensors by key); InputTypeError for what cannot be stored."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def encode(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            return float(value)
        if isinstance(value, torch.Tensor):
            key = path or "tensor"
            if key in tensors:  # a dict key containing "." can repeat a path; keep the keys unique
                key = f"{key}#{len(tensors)}"
            tensor = value.detach().to("cpu").contiguous()
            storage = tensor.untyped_storage().data_ptr()
            if storage in storages and tensor.numel():  # safetensors refuses tensors that share memory
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[key] = tensor
            return {TENSOR: key}
        if isinstance(value, tuple):
            return {TUPLE: [encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in MARKERS for k in value):
                return {k: encode(v, f"{path}.{k}" if path else k) for k, v in value.items()}
            return {DICT: [[encode(k, f"{path}.key{i}"), encode(v, f"{path}.{k}")] for i, (k, v) in enumerate(value.items())]}
        raise InputTypeError(
            f"cannot store {type(value).__name__} at {path or 'the top level'!r} without pickle; "
            "a training state may hold tensors, numbers, strings, None, lists, tuples and dicts"
        )

    return encode(state, ""), tensors


class _Invalid(Exception):
    """A JSON structure that does not decode (turned into CorruptCheckpointError by the caller)."""


def decode_state(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`; raises _Invalid when ``structure`` is not one it wrote."""

    def decode(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            raise _Invalid(f"unexpected {type(value).__name__} in the structure")
        if TENSOR in value:
            key = value[TENSOR]
            if len(value) != 1 or not isinstance(key, str):
                raise _Invalid(f"malformed tensor reference {value!r}")
            if key not in tensors:
                raise _Invalid(f"it names tensor {key!r}, which the .safetensors file does not hold")
            return tensors[key]
        if TUPLE in value:
            if len(value) != 1 or not isinstance(value[TUPLE], list):
                raise _Invalid(f"malformed tuple {value!r}")
            return tuple(decode(v) for v in value[TUPLE])
        if DICT in value:
            pairs = value[DICT]
            if len(value) != 1 or not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise _Invalid("malformed key/value pairs")
            return {_hashable(decode(k)): decode(v) for k, v in pairs}
        return {k: decode(v) for k, v in value.items()}

    return decode(structure)


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor)):
        raise _Invalid(f"a dict key of type {type(key).__name__}")
    return key


# --- files -----------------------------------------------------------------------------


def save_state(state: Any, folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``state`` as ``folder/<name>.json`` and ``folder/<name>.safetensors`` (callers make them atomic
    by writing into a temporary folder, as checkpoints do)."""
    folder = Path(folder)
    structure, tensors = encode_state(state)
    json_name, tensors_name = state_file_names(name)
    save_file(tensors, str(folder / tensors_name), metadata={"format": FORMAT})
    # allow_nan: the scaler's and the RNG's floats may be infinite; json reads Infinity/NaN back
    (folder / json_name).write_text(json.dumps({"format": FORMAT, "state": structure}, allow_nan=True))
    return folder / json_name, folder / tensors_name


def read_tensors(path: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; CorruptCheckpointError naming it when it is missing, truncated or not safetensors."""
    if not path.is_file():
        raise CorruptCheckpointError(checkpoint, path, "the file is missing")
    try:
        return load_file(str(path))
    except Exception as error:  # SafetensorError (truncated, bad header), OSError
        raise CorruptCheckpointError(checkpoint, path, f"not a readable safetensors file ({error})") from error


def read_json(path: Path, checkpoint: Path) -> Any:
    """A JSON file's content; CorruptCheckpointError naming it when it is missing or does not parse."""
    if not path.is_file():
        raise CorruptCheckpointError(checkpoint, path, "the file is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CorruptCheckpointError(checkpoint, path, f"not valid JSON ({error})") from error


def load_state(folder: str | os.PathLike, name: str) -> Any:
    """Read what :func:`save_state` wrote; CorruptCheckpointError naming ``folder`` and the bad file."""
    folder = Path(folder)
    json_name, tensors_name = state_file_names(name)
    document = read_json(folder / json_name, folder)
    if not isinstance(document, dict) or document.get("format") != FORMAT or "state" not in document:
        raise CorruptCheckpointError(folder, folder / json_name, f"expected a {FORMAT!r} document with a 'state' entry")
    tensors = read_tensors(folder / tensors_name, folder)
    try:
        return decode_state(document["state"], tensors)
    except _Invalid as error:
        raise CorruptCheckpointError(folder, folder / json_name, str(error)) from None


def states_equal(a: Any, b: Any) -> bool:
    """True when two states hold the same structure, types and values (tensors: dtype, shape and bits; NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8))
        )  # fmt: skip
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b
