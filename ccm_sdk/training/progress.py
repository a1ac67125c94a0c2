"""Progress bar and loss history (CSV and a PNG curve at the end of training)."""

from __future__ import annotations

import csv
import os
from pathlib import Path


class LossHistory:
    """(step, loss, lr) per optimizer step; saved in checkpoints so a resumed run keeps its curve."""

    def __init__(self, rows: list[list[float]] | None = None):
        self.rows: list[tuple[int, float, float]] = [(int(s), float(v), float(lr)) for s, v, lr in rows or []]

    def add(self, step: int, loss: float, lr: float) -> None:
        self.rows.append((step, loss, lr))

    def state(self) -> list[list[float]]:
        return [list(row) for row in self.rows]

    @property
    def last(self) -> float | None:
        return self.rows[-1][1] if self.rows else None

    def write_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "loss", "lr"])
            writer.writerows(self.rows)
        return path

    def plot(self, path: str | os.PathLike, *, title: str = "training loss") -> Path:
        """Raw loss and its exponential moving average against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r[0] for r in self.rows]
        losses = [r[1] for r in self.rows]
        smooth, value = [], None
        for loss in losses:
            value = loss if value is None else 0.9 * value + 0.1 * loss
            smooth.append(value)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="EMA 0.9")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
            ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path


def progress_bar(total: int, initial: int, *, enabled: bool, desc: str):
    """tqdm over optimizer steps: shows steps/s and the ETA; loss and lr go in the postfix."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)
