"""An evaluation's finished cells kept on disk, so that a stopped run goes on where it was.

A cell is one method at one step count on one condition: its row of scores and its first
``show`` samples (as float16: they only make the figure), written as ``<folder>/<cell>/{row.json, samples.safetensors}`` when it is done
(atomically: a cell is there whole or not at all). A cell is reused only by a run of the same
config (a fingerprint of everything in it but ``output_dir`` and ``device``), so changing the
samples, seeds, methods' settings or model paths starts over. Model files changed in place under
the same paths are not detected: start over then (``ccm eval`` without ``--resume``).
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

from ..training.export import atomic_folder

if TYPE_CHECKING:
    from .config import EvalConfig
    from .runner import EvalRow

ROW, SAMPLES = "row.json", "samples.safetensors"


def config_fingerprint(config: EvalConfig) -> str:
    """What makes two runs' cells interchangeable: the config without where it writes and runs."""
    data = config.model_dump(mode="json", exclude={"output_dir", "device"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class EvalProgress:
    """The cells of one config in ``folder``."""

    def __init__(self, folder: str | os.PathLike, config: EvalConfig):
        self.folder, self.fingerprint = Path(folder), config_fingerprint(config)

    @staticmethod
    def cell_name(method: str, steps: int, condition: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{method}--{steps}--{condition}")

    def load(self, method: str, steps: int, condition: str) -> tuple[EvalRow, torch.Tensor] | None:
        """The finished cell's row and samples, or None when this config has not finished it here."""
        from .runner import EvalRow

        cell = self.folder / self.cell_name(method, steps, condition)
        try:
            saved = json.loads((cell / ROW).read_text())
            if saved.get("fingerprint") != self.fingerprint:
                return None
            return EvalRow(**saved["row"]), load_file(str(cell / SAMPLES))["samples"].float()
        except (OSError, ValueError, KeyError, TypeError):  # missing, or not this format: compute it again
            return None

    def save(self, row: EvalRow, samples: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_folder(self.folder / self.cell_name(row.method, row.steps, row.condition)) as tmp:
            # float16: the samples only make the figure (uint8), and the archive of a world build keeps them
            save_file({"samples": samples.detach().half().cpu().contiguous()}, str(tmp / SAMPLES))
            (tmp / ROW).write_text(json.dumps({"fingerprint": self.fingerprint, "row": asdict(row)}, indent=1))

    def clear(self) -> None:
        """Forget every kept cell (a run that starts over)."""
        shutil.rmtree(self.folder, ignore_errors=True)
