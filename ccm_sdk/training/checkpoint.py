"""Training checkpoints: written atomically, the last k kept, everything needed to resume exactly.

A checkpoint is a folder ``checkpoints/step-00000010/`` (format 2):

    weights/<name>.safetensors               trainable weights (and e.g. the EMA target), float32
    optimizer.{json,safetensors}             optimizer state (``state_files``: tensors + JSON, no pickle)
    scheduler.{json,safetensors}             LR schedule; scaler.{json,safetensors} with fp16 only
    rng-rank<r>.{json,safetensors}           python / numpy / torch (/ CUDA) RNG states, one pair per process
    state.json                               format, step, trainer, world size, the files' names and SHA-256
                                             digests, loss history

It is assembled under a hidden temporary name and renamed into place in one ``os.replace``
(``ccm_sdk.utils.atomic``), so a process killed at any moment leaves either the complete checkpoint
or none. The data order needs no state: it is a function of the step (``batches.py``).

Loading checks every file a checkpoint should hold (present, safetensors not truncated, JSON that
parses, the keys expected) and raises :class:`~ccm_sdk.errors.CorruptCheckpointError` naming the
checkpoint and the bad file; a file whose bytes changed after it was written (a flipped bit that leaves
it readable) fails its SHA-256 digest in state.json. Format-1 checkpoints (``optimizer.pt``, ``rng-rank<r>.pt``) still load,
with ``torch.load(weights_only=True)``: a ``.pt`` file that needs pickle to run code is refused as corrupt.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CorruptCheckpointError, TrainingError
from ..utils.atomic import TMP_PREFIX, replace_folder, temporary_folder
from ..utils.digest import file_sha256
from .state_files import load_state, read_json, read_tensors, save_state, state_file_names

PREFIX = "step-"
CORRUPT_PREFIX = "corrupt-"
STATE_NAME = "state.json"
FORMAT = 2
# keys a state must hold for its owner's load_state_dict to take it
REQUIRED_KEYS = {"optimizer": ("state", "param_groups"), "scheduler": ("last_epoch",)}


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | os.PathLike, *, complete: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are ignored); ``complete=False``
    adds ``step-N`` folders that lack their state.json (damaged after they were written)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and (not complete or (path / STATE_NAME).is_file()):
            try:
                found.append((int(path.name[len(PREFIX) :]), path))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# --- RNG states ------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors, numbers and lists (what ``state_files`` stores without pickle)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save / load -----------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What a checkpoint holds, as the trainer hands it over or gets it back."""

    step: int
    weights: dict[str, dict[str, torch.Tensor]]  # name -> state dict
    objects: dict[str, Any]  # optimizer, scheduler, scaler state dicts
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable: trainer, world size, history
    rng: dict[str, Any] | None = None  # this process's RNG states (loading only)


def save_checkpoint(accelerator, root: str | os.PathLike, checkpoint: Checkpoint, *, keep_last: int) -> Path:
    """Write ``checkpoint`` atomically on the main process, with every process's RNG state; keep the last k."""
    root = Path(root)
    final = root / checkpoint_name(checkpoint.step)
    # 1. the main process makes a fresh temporary folder
    tmp = temporary_folder(final) if accelerator.is_main_process else final.with_name(f"{TMP_PREFIX}{final.name}")
    accelerator.wait_for_everyone()
    # 2. every process adds its RNG state
    save_state(capture_rng(), tmp, f"rng-rank{accelerator.process_index}")
    accelerator.wait_for_everyone()
    # 3. the main process writes the rest and renames the folder into place (a run that resumed from
    # an earlier step writes this step again: it replaces the old one)
    if accelerator.is_main_process:
        (tmp / "weights").mkdir()
        for name, state in checkpoint.weights.items():
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / "weights" / f"{name}.safetensors"))
        for name, obj in checkpoint.objects.items():
            save_state(obj, tmp, name)
        meta = {
            "format": FORMAT, "step": checkpoint.step, "world_size": accelerator.num_processes,
            "weights": sorted(checkpoint.weights), "objects": sorted(checkpoint.objects), **checkpoint.meta,
            "digests": {f.relative_to(tmp).as_posix(): file_sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()},
        }  # fmt: skip
        (tmp / STATE_NAME).write_text(json.dumps(meta))
        replace_folder(tmp, final)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    path: str | os.PathLike, *, rank: int, world_size: int | None, trainer: str, objects: tuple[str, ...] = ()
) -> Checkpoint:
    """Read a checkpoint for process ``rank`` of ``world_size`` (None: any, to read its weights only);
    ``objects``: the states it must hold (``("optimizer", "scheduler")`` to resume).

    TrainingError if it does not fit this run; CorruptCheckpointError, naming the file, if it is damaged.
    """
    path = Path(path)
    state_file = path / STATE_NAME
    if not path.is_dir() or not (state_file.is_file() or path.name.startswith(PREFIX) or (path / "weights").is_dir()):
        raise TrainingError(f"{str(path)!r} is not a training checkpoint ({STATE_NAME} is missing)")
    meta = _read_meta(path)
    if meta.get("trainer") != trainer:
        raise TrainingError(f"checkpoint {str(path)!r} was written by trainer {meta.get('trainer')!r}, not {trainer!r}")
    if world_size is not None and meta.get("world_size") != world_size:
        raise TrainingError(
            f"checkpoint {str(path)!r} was written by {meta.get('world_size')} process(es) but this run has {world_size}; "
            "resume with the same number of processes so the data order and random streams continue exactly"
        )
    old = meta.get("format", 1) == 1
    read = _read_format_1 if old else _read_format_2
    weights, states, rng = read(path, meta, rank if world_size is not None else None)

    def file(name: str) -> Path:
        return path / (f"{name}.pt" if old else state_file_names(name)[0])

    for name in objects:
        if name not in states:
            raise CorruptCheckpointError(path, file(name), f"the file is missing (the checkpoint holds no {name} state)")
    for name, state in states.items():
        missing = [key for key in REQUIRED_KEYS.get(name, ()) if not isinstance(state, dict) or key not in state]
        if missing:
            raise CorruptCheckpointError(path, file(name), f"the {name} state lacks the keys {missing}")
    # last, so a file that does not parse is reported as such: bytes changed after the write
    for name, digest in ({} if old else meta.get("digests") or {}).items():
        if not (path / name).is_file():
            raise CorruptCheckpointError(path, path / name, "the file is missing")
        if file_sha256(path / name) != digest:
            raise CorruptCheckpointError(
                path, path / name, "its bytes changed after the checkpoint was written (SHA-256 differs from the digest in state.json)"
            )
    return Checkpoint(step=int(meta["step"]), weights=weights, objects=states, meta=meta, rng=rng)


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / STATE_NAME
    meta = read_json(file, path)
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(path, file, f"expected a JSON object, got {type(meta).__name__}")
    expected = {"step": int, "trainer": str, "world_size": int}
    if meta.get("format", 1) != 1:
        expected.update(format=int, weights=list, objects=list)
    wrong = [f"{k} ({t.__name__})" for k, t in expected.items() if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
    for key in ("weights", "objects"):  # file names: plain, non-empty strings
        if key in expected and isinstance(meta.get(key), list) and not all(isinstance(n, str) and n and "/" not in n for n in meta[key]):
            wrong.append(f"{key} (a list of names)")
    digests = meta.get("digests", {})
    if not isinstance(digests, dict) or not all(
        isinstance(n, str) and n and not n.startswith("/") and ".." not in n.split("/") and n != STATE_NAME
        and isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)
        for n, d in digests.items()
    ):  # fmt: skip
        wrong.append("digests (file name -> SHA-256 hex digest)")
    history = meta.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(row, list) and len(row) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
        for row in history
    ):
        wrong.append("history (a list of [step, loss, lr])")
    if wrong:
        raise CorruptCheckpointError(path, file, f"missing or mistyped keys: {', '.join(wrong)}")
    named = path.name[len(PREFIX):] if path.name.startswith(PREFIX) else None
    if meta["step"] < 1 or (named is not None and named.isdigit() and int(named) != meta["step"]):
        raise CorruptCheckpointError(path, file, f"step {meta['step']} does not fit the checkpoint {path.name!r}"
                                     + (f" (expected {int(named)})" if named is not None and named.isdigit() else " (expected 1 or more)"))
    if meta.get("format", 1) not in (1, FORMAT):
        raise CorruptCheckpointError(path, file, f"unknown checkpoint format {meta['format']} (this version reads 1 and {FORMAT})")
    return meta


def _read_weights(path: Path, names) -> dict[str, dict[str, torch.Tensor]]:
    return {name: read_tensors(path / "weights" / f"{name}.safetensors", path) for name in names}


def _read_format_2(path: Path, meta: dict[str, Any], rank: int | None):
    weights = _read_weights(path, meta["weights"])
    states = {name: load_state(path, name) for name in meta["objects"]}
    # every process checks every RNG file, so all of them judge the checkpoint alike
    rngs = {r: load_state(path, f"rng-rank{r}") for r in range(meta["world_size"])}
    return weights, states, (rngs.get(rank) if rank is not None else None)


def _read_format_1(path: Path, meta: dict[str, Any], rank: int | None):
    weights = _read_weights(path, sorted(p.stem for p in (path / "weights").glob("*.safetensors")))
    states = {p.stem: _torch_load(p, path) for p in sorted(path.glob("*.pt")) if not p.name.startswith("rng-")}
    rng = _torch_load(path / f"rng-rank{rank}.pt", path) if rank is not None else None
    return weights, states, rng


def _torch_load(file: Path, checkpoint: Path) -> Any:
    """A format-1 ``.pt`` file, weights only: its pickle opcodes may build tensors and containers, never run code."""
    if not file.is_file():
        raise CorruptCheckpointError(checkpoint, file, "the file is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message advises weights_only=False; keep only the line saying what the file asked for
        lines = [line for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        detail = f" ({lines[0].strip()})" if lines else ""
        raise CorruptCheckpointError(
            checkpoint, file, f"not a weights-only torch file: loading it would run pickled code, which is refused{detail}"
        ) from None
    except Exception as error:  # a truncated zip archive, a file that is not a torch file at all
        raise CorruptCheckpointError(checkpoint, file, f"not a readable torch file ({error})") from error


def mark_corrupt(path: str | os.PathLike) -> Path:
    """Rename a corrupt checkpoint ``step-N`` to ``corrupt-step-N`` (``-2``, ... if taken) so that neither
    resume nor rotation picks it up again; the files stay for a look."""
    path = Path(path)
    target = path.with_name(f"{CORRUPT_PREFIX}{path.name}")
    count = 1
    while target.exists():
        count += 1
        target = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{count}")
    os.replace(path, target)
    return target
