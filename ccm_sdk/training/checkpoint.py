"""Training checkpoints: written atomically, the last k kept, everything needed to resume exactly.

A checkpoint is a folder ``checkpoints/step-00000010/``:

    weights/<name>.safetensors   trainable weights (and e.g. the EMA target), float32
    optimizer.pt  scheduler.pt  scaler.pt (fp16 only)
    rng-rank<r>.pt               python / numpy / torch (/ CUDA) RNG states, one file per process
    state.json                   step, trainer, world size, loss history

It is assembled under a hidden temporary name and renamed into place in one ``os.replace``
(``ccm_sdk.utils.atomic``), so a process killed at any moment leaves either the complete checkpoint
or none. The data order needs no state: it is a function of the step (``batches.py``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError
from ..utils.atomic import TMP_PREFIX, replace_folder, temporary_folder

PREFIX = "step-"
STATE_NAME = "state.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and (path / STATE_NAME).is_file():
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
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
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
    torch.save(capture_rng(), tmp / f"rng-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    # 3. the main process writes the rest and renames the folder into place (a run that resumed from
    # an earlier step writes this step again: it replaces the old one)
    if accelerator.is_main_process:
        (tmp / "weights").mkdir()
        for name, state in checkpoint.weights.items():
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / "weights" / f"{name}.safetensors"))
        for name, obj in checkpoint.objects.items():
            torch.save(obj, tmp / f"{name}.pt")
        meta = {"step": checkpoint.step, "world_size": accelerator.num_processes, **checkpoint.meta}
        (tmp / STATE_NAME).write_text(json.dumps(meta))
        replace_folder(tmp, final)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: str | os.PathLike, *, rank: int, world_size: int | None, trainer: str) -> Checkpoint:
    """Read a checkpoint for process ``rank`` of ``world_size`` (None: any, to read its weights only);
    TrainingError if it does not fit."""
    path = Path(path)
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise TrainingError(f"{str(path)!r} is not a training checkpoint ({STATE_NAME} is missing)")
    meta = json.loads(state_file.read_text())
    if meta.get("trainer") != trainer:
        raise TrainingError(f"checkpoint {str(path)!r} was written by trainer {meta.get('trainer')!r}, not {trainer!r}")
    if world_size is not None and meta.get("world_size") != world_size:
        raise TrainingError(
            f"checkpoint {str(path)!r} was written by {meta.get('world_size')} process(es) but this run has {world_size}; "
            "resume with the same number of processes so the data order and random streams continue exactly"
        )
    weights = {p.stem: load_file(str(p)) for p in sorted((path / "weights").glob("*.safetensors"))}
    objects = {
        p.stem: torch.load(p, map_location="cpu", weights_only=True) for p in sorted(path.glob("*.pt")) if not p.name.startswith("rng-")
    }
    rng = torch.load(path / f"rng-rank{rank}.pt", map_location="cpu", weights_only=True)
    return Checkpoint(step=int(meta["step"]), weights=weights, objects=objects, meta=meta, rng=rng)
