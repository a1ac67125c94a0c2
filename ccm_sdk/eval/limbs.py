"""Limb accuracy: are the limbs of the figures a caption asks for there, as a pose estimator reads them?

For a dataset that knows, per image, the line segments of its figures' limbs (``segments``, the
ground-truth skeleton in pixel coordinates) and names a condition that draws the skeleton it reads
from an image as bright lines on black (``detector``, e.g. the world's ``world-pose``), the measure
runs the detector on each image and counts a limb as found when at least ``min_cover`` of the
points along it (one every half pixel) have a line pixel (any channel above ``threshold``) within
``tolerance`` pixels (a square window). The score is the share of found limbs over all limbs of all
images: about 1 for real images (up to the detector's own errors) and 0 for an image with no figure.

A dataset opts in with a ``limb_targets(index) -> LimbTargets`` method (the world dataset has one);
``ccm eval`` then adds a limb column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ShapeError
from .pooled import pooled_share


@dataclass(frozen=True)
class LimbTargets:
    """The limbs one image's caption asks for, and the condition that reads skeletons back from images."""

    segments: torch.Tensor  # float [L, 2, 2]: each limb's two ends as (x, y) pixels (pixel (i, j) covers [j, j+1) x [i, i+1))
    detector: str  # a registered condition whose map draws the skeletons it finds as bright lines on black

    def __post_init__(self):
        if self.segments.ndim != 3 or tuple(self.segments.shape[1:]) != (2, 2):
            raise ShapeError(f"expected limb segments [L, 2, 2], got {tuple(self.segments.shape)}")


def limb_hits(skeleton: torch.Tensor, segments: torch.Tensor, *, threshold: float = 0.2, tolerance: int = 1,
              min_cover: float = 0.6) -> tuple[int, int]:  # fmt: skip
    """(found limbs, limbs) of one detector map [C, H, W] in [0, 1] against ``segments`` [L, 2, 2]."""
    if skeleton.ndim != 3:
        raise ShapeError(f"expected a skeleton map [C, H, W], got {tuple(skeleton.shape)}")
    lines = (skeleton.float().amax(0) > threshold).float()[None, None]
    near = F.max_pool2d(lines, 2 * tolerance + 1, stride=1, padding=tolerance)[0, 0] > 0
    height, width = near.shape
    found = 0
    for start, end in segments.float().tolist():
        count = max(2, math.ceil(2 * math.dist(start, end)) + 1)
        t = torch.linspace(0, 1, count)[:, None]
        points = torch.tensor(start) * (1 - t) + torch.tensor(end) * t
        cols = points[:, 0].floor().long().clamp(0, width - 1)
        rows = points[:, 1].floor().long().clamp(0, height - 1)
        found += int(float(near[rows, cols].float().mean()) >= min_cover)
    return found, segments.shape[0]


def limb_accuracy(skeletons: torch.Tensor, targets: list[LimbTargets], *, threshold: float = 0.2, tolerance: int = 1,
                  min_cover: float = 0.6) -> float:  # fmt: skip
    """Share of limbs found, over the detector maps ``skeletons`` [N, C, H, W] of N images (NaN: no limbs)."""
    return pooled_share(
        skeletons, targets,
        lambda skeleton, target: limb_hits(skeleton, target.segments, threshold=threshold, tolerance=tolerance, min_cover=min_cover),
        target_name="LimbTargets", item_name="map",
    )  # fmt: skip
