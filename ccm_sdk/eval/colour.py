"""Colour accuracy: does each region of a generated image take the colour the caption asks for?

For a dataset that knows, per image, which pixels belong to which region (the background and each
object) and which palette colour the caption asks for each region, a region counts as right when
the palette colour nearest to its mean generated colour is the asked one. The score is the share of
right regions over all regions of all images (regions smaller than ``min_pixels`` are left out:
a few pixels' mean is mostly the edge between two regions).

A dataset opts in with a ``colour_targets(index) -> ColourTargets`` method (the world dataset has
one); ``ccm eval`` then adds a colour column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ShapeError
from .pooled import pooled_share


@dataclass(frozen=True)
class ColourTargets:
    """What one image's caption asks of its regions."""

    regions: torch.Tensor  # long [H, W]: the region of each pixel, 0..R-1
    asked: torch.Tensor  # long [R]: the palette index the caption asks for each region
    palette: torch.Tensor  # float [P, 3] in [0, 1]

    def __post_init__(self):
        if self.regions.ndim != 2 or self.asked.ndim != 1 or self.palette.ndim != 2 or self.palette.shape[1] != 3:
            raise ShapeError(
                f"expected regions [H, W], asked [R] and palette [P, 3], got {tuple(self.regions.shape)}, "
                f"{tuple(self.asked.shape)} and {tuple(self.palette.shape)}"
            )


def region_colours(image: torch.Tensor, targets: ColourTargets, *, min_pixels: int = 4) -> list[int | None]:
    """Per region of one image [3, H, W] in [0, 1]: the palette index nearest its mean colour (None: fewer than
    ``min_pixels`` pixels, not scored)."""
    if image.ndim != 3 or image.shape[0] != 3 or tuple(image.shape[1:]) != tuple(targets.regions.shape):
        raise ShapeError(f"expected an image [3, {', '.join(map(str, targets.regions.shape))}], got {tuple(image.shape)}")
    pixels = image.float().flatten(1).T  # [H*W, 3]
    regions = targets.regions.flatten().to(pixels.device)
    nearest: list[int | None] = []
    for region in range(len(targets.asked)):
        inside = regions == region
        if int(inside.sum()) < min_pixels:
            nearest.append(None)
            continue
        mean = pixels[inside].mean(0)
        nearest.append(int((targets.palette.to(mean) - mean).square().sum(1).argmin()))
    return nearest


def region_hits(image: torch.Tensor, targets: ColourTargets, *, min_pixels: int = 4) -> tuple[int, int]:
    """(right regions, scored regions) of one image [3, H, W] in [0, 1]."""
    pairs = [(n, a) for n, a in zip(region_colours(image, targets, min_pixels=min_pixels), targets.asked.tolist()) if n is not None]
    return sum(n == a for n, a in pairs), len(pairs)


def colour_accuracy(images: torch.Tensor, targets: list[ColourTargets], *, min_pixels: int = 4) -> float:
    """Share of regions, over all ``images`` [N, 3, H, W] in [0, 1], whose mean colour is nearest the asked one."""
    return pooled_share(images, targets, lambda image, target: region_hits(image, target, min_pixels=min_pixels),
                        target_name="ColourTargets", item_name="image")  # fmt: skip
