"""A sample sheet of the world for people to look at: images, captions and every ground-truth map."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import torch

from .dataset import WORLD_CONDITIONS, WorldDataset


def displayable(control: torch.Tensor) -> np.ndarray:
    """A control map [C, H, W] as RGB [H, W, 3]; a mask map shows its masked pixels in grey."""
    if control.shape[0] == 4:
        masked = control[3:]
        rgb = control[:3] * (1 - masked) + 0.5 * masked
        return rgb.permute(1, 2, 0).numpy()
    return control[:3].permute(1, 2, 0).numpy()


def save_sample_grid(path: str | os.PathLike, *, rows: int = 6, size: int = 64, seed: int = 0, start: int = 0) -> Path:
    """Write a PNG: one row per sample (its caption above), columns image + each control map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = WorldDataset(size=size, length=start + rows, seed=seed)
    columns = ("image", *WORLD_CONDITIONS)
    figure, axes = plt.subplots(rows, len(columns), figsize=(1.05 * len(columns), 1.32 * rows), squeeze=False)
    for row in range(rows):
        item = data[start + row]
        panels = [item["image"].permute(1, 2, 0).numpy()] + [displayable(item["controls"][c]) for c in WORLD_CONDITIONS]
        for column, (name, panel) in enumerate(zip(columns, panels)):
            axis = axes[row][column]
            axis.imshow(np.clip(panel, 0, 1), interpolation="nearest")
            axis.set_xticks([]), axis.set_yticks([])
            if row == rows - 1:
                axis.set_xlabel(name, fontsize=8)
        caption = "\n".join(textwrap.wrap(item["caption"], 120))
        axes[row][0].annotate(caption, (0, 1.02), xycoords="axes fraction", fontsize=6.5, va="bottom", ha="left",
                              annotation_clip=False)  # fmt: skip
    figure.subplots_adjust(left=0.01, right=0.99, top=0.97, bottom=0.04, wspace=0.05, hspace=0.35)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
