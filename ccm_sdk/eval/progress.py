"""An evaluation's finished cells kept on disk, so that a stopped run goes on where it was.

A cell is one method at one step count on one condition: its row of scores and its first
``show`` samples (as float16: they only make the figure), written as ``<folder>/<cell>/{row.json, samples.safetensors}`` when it is done
(atomically: a cell is there whole or not at all). A cell is reused only when everything it
depends on is unchanged: a fingerprint of the config's shared settings (dataset, samples, seed,
batch size, features) with the cell's own method (models, sampler, guidance...) and condition.
So adding a method or a condition to a config keeps the cells already made, while changing the
samples, seeds, a method's settings or its models makes those cells again. A model is known by
its contents as well as its name (a SHA-256 of the files of its local folder, a hub snapshot or a
plugin's ``name:argument`` resolved, without network access): a model trained again under the same
path makes its cells again, and the same files in another clone or folder keep them. The guidance a
model recommends lives in its folder (``ccm_defaults.json``), so it counts too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from ..errors import CCMError
from ..utils.atomic import atomic_folder
from ..utils.digest import TreeDigests

from .results import EvalRow

if TYPE_CHECKING:
    from .config import ConditionConfig, EvalConfig, MethodConfig

ROW, SAMPLES = "row.json", "samples.safetensors"


# what no cell depends on (where it writes and runs, the figure, the analyses), and what each cell
# takes only its own part of (its method, its condition)
_NOT_SHARED = {"output_dir", "device", "show", "warmup", "correlation", "methods", "paper", "conditions"}


_DIGESTS = TreeDigests()  # a model's files are read once per run while they stay unchanged


def model_contents(source: str | None) -> str | None:
    """A SHA-256 of what ``source`` names (local folder or file, hub snapshot in the cache, a plugin's
    ``name:argument``), or None when it cannot be found offline (a ControlNet provider's name, a hub
    id not downloaded yet): then the name alone identifies it."""
    if source is None:
        return None
    from ..models.loading import resolve_model_path

    try:
        path = resolve_model_path(source, local_files_only=True)
        return _DIGESTS.get(path)
    except (CCMError, OSError):
        return None


def cell_fingerprint(config: EvalConfig, method: MethodConfig, condition: ConditionConfig) -> str:
    """What makes a cell of one run interchangeable with another's: the shared settings, its method and
    condition, and the contents of the models they name."""
    controlnet = method.controlnets.get(condition.title)  # of the method's ControlNets, only the one this cell uses
    data = {
        "shared": config.model_dump(mode="json", exclude=_NOT_SHARED),
        "method": {**method.model_dump(mode="json"), "controlnets": controlnet},
        "condition": condition.model_dump(mode="json"),
        "contents": [model_contents(source) for source in (method.model, method.lora, method.adapter, controlnet, config.features.path)],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class EvalProgress:
    """The cells of one config in ``folder``."""

    def __init__(self, folder: str | os.PathLike, config: EvalConfig):
        self.folder, self.config = Path(folder), config

    @staticmethod
    def cell_name(method: str, steps: int, condition: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{method}--{steps}--{condition}")

    def load(self, method: MethodConfig, steps: int, condition: ConditionConfig) -> tuple[EvalRow, torch.Tensor] | None:
        """The finished cell's row and samples, or None when it was not made here with these settings."""
        cell = self.folder / self.cell_name(method.name, steps, condition.title)
        try:
            saved = json.loads((cell / ROW).read_text())
            if saved.get("fingerprint") != cell_fingerprint(self.config, method, condition):
                return None
            return EvalRow(**saved["row"]), load_file(str(cell / SAMPLES))["samples"].float()
        except (OSError, ValueError, KeyError, TypeError):  # missing, or not this format: compute it again
            return None

    def save(self, row: EvalRow, samples: torch.Tensor, method: MethodConfig, condition: ConditionConfig) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fingerprint = cell_fingerprint(self.config, method, condition)
        with atomic_folder(self.folder / self.cell_name(row.method, row.steps, row.condition)) as tmp:
            # float16: the samples only make the figure (uint8), and the archive of a world build keeps them
            save_file({"samples": samples.detach().half().cpu().contiguous()}, str(tmp / SAMPLES))
            (tmp / ROW).write_text(json.dumps({"fingerprint": fingerprint, "row": asdict(row)}, indent=1))

    def clear(self) -> None:
        """Forget every kept cell (a run that starts over)."""
        shutil.rmtree(self.folder, ignore_errors=True)
