"""Validation samples while training: images from the current weights, as a grid every ``validation.interval`` steps.

The samples come from the first ``validation.num_images`` items of the training data (their
captions, control maps and images), with a fixed seed, so grids of successive steps compare
like for like. Rendering them never touches the random streams the training draws from, so a
run with validation gives the same weights as one without.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from ..datasets import collate
from ..images import from_tensor, to_rgb
from .checkpoint import capture_rng, restore_rng

Rows = list[tuple[str, torch.Tensor]]  # (label, [B, C, H, W] in [0, 1]) per grid row

MIN_CELL = 128  # small training images are enlarged to at least this many pixels in the grid


def sample_name(step: int) -> str:
    return f"step-{step:08d}.png"


def validation_batch(dataset, count: int) -> dict[str, Any]:
    """The first ``count`` items of ``dataset`` (fewer if it is smaller), collated as the trainers see a batch."""
    with isolated_rng():  # a dataset may draw (random crops, masks) when an item is read
        return collate([dataset[i] for i in range(min(count, len(dataset)))])


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving the python, numpy and torch random streams the training uses."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Modules in eval mode for the block, each back in its own mode after it."""
    modes = [(module, module.training) for module in modules]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


def grid_image(rows: Rows, *, pad: int = 2) -> Image.Image:
    """One row of images per ``(label, tensor)``, with the labels on the left and numbered columns."""
    tiles = [[image for image in from_tensor(to_rgb(tensor.detach().float().cpu().clamp(0, 1)), "pil")] for _, tensor in rows]
    height = max(image.height for row in tiles for image in row)
    scale = max(1, -(-MIN_CELL // height))
    cell_w = max(image.width for row in tiles for image in row) * scale
    cell_h = height * scale
    label_w = 8 + 7 * max(len(label) for label, _ in rows)
    columns = max(len(row) for row in tiles)
    grid = Image.new("RGB", (label_w + columns * (cell_w + pad) + pad, 14 + len(rows) * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(columns):
        draw.text((label_w + pad + c * (cell_w + pad), 2), str(c), fill="black")
    for r, ((label, _), row) in enumerate(zip(rows, tiles)):
        top = 14 + pad + r * (cell_h + pad)
        draw.text((4, top + cell_h // 2 - 5), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image.resize((image.width * scale, image.height * scale), Image.NEAREST), (label_w + pad + c * (cell_w + pad), top))
    return grid


def save_samples(rows: Rows, captions: Sequence[str], folder: Path, step: int) -> Path:
    """Write ``samples/step-<8-digit step>.png`` (and ``captions.txt`` once); returns the grid's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / sample_name(step)
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid_image(rows).save(tmp)
    tmp.replace(path)
    if captions:
        (folder / "captions.txt").write_text("".join(f"{i}: {caption}\n" for i, caption in enumerate(captions)))
    return path
