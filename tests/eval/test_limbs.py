"""Limb accuracy by hand (ccm_sdk.eval.limbs)."""

from __future__ import annotations

import math

import pytest
import torch

from ccm_sdk.errors import ShapeError
from ccm_sdk.eval.limbs import LimbTargets, limb_accuracy, limb_hits

# three limbs: a horizontal one along row 4, a vertical one along column 10, a diagonal
SEGMENTS = torch.tensor([[[2.5, 4.5], [12.5, 4.5]], [[10.5, 8.5], [10.5, 18.5]], [[2.5, 8.5], [8.5, 14.5]]])


def _skeleton(limbs: list[int], shift: int = 0) -> torch.Tensor:
    canvas = torch.zeros(3, 20, 20)
    if 0 in limbs:
        canvas[0, 4 + shift, 2:13] = 1.0
    if 1 in limbs:
        canvas[1, 8:19, 10 + shift] = 0.8
    if 2 in limbs:
        for i in range(7):
            canvas[2, 8 + i + shift, 2 + i] = 1.0
    return canvas


def test_drawn_limbs_are_found_and_missing_ones_are_not():
    assert limb_hits(_skeleton([0, 1, 2]), SEGMENTS) == (3, 3)
    assert limb_hits(_skeleton([0, 2]), SEGMENTS) == (2, 3)
    assert limb_hits(torch.zeros(3, 20, 20), SEGMENTS) == (0, 3)


def test_tolerance_threshold_and_cover():
    assert limb_hits(_skeleton([0, 1, 2], shift=1), SEGMENTS) == (3, 3)  # a pixel off: within the 1-px tolerance
    assert limb_hits(_skeleton([0, 1, 2], shift=3), SEGMENTS) == (0, 3)
    assert limb_hits(_skeleton([0, 1, 2], shift=3), SEGMENTS, tolerance=3) == (3, 3)
    assert limb_hits(_skeleton([0, 1, 2]) * 0.1, SEGMENTS) == (0, 3)  # too faint to be a line
    half = _skeleton([0])
    half[0, 4, 7:] = 0.0  # the first limb drawn over its left half only: 55% covered within a pixel
    assert limb_hits(half, SEGMENTS[:1]) == (0, 1)
    assert limb_hits(half, SEGMENTS[:1], min_cover=0.5) == (1, 1)


def test_accuracy_pools_limbs_over_images():
    targets = [LimbTargets(SEGMENTS, "world-pose"), LimbTargets(SEGMENTS[:1], "world-pose"), LimbTargets(torch.zeros(0, 2, 2), "world-pose")]
    maps = torch.stack([_skeleton([1]), _skeleton([0]), _skeleton([])])
    assert limb_accuracy(maps, targets) == pytest.approx(2 / 4)
    assert math.isnan(limb_accuracy(maps[2:], targets[2:]))


def test_shapes_are_checked():
    with pytest.raises(ShapeError, match=r"expected limb segments \[L, 2, 2\], got \(3, 4\)"):
        LimbTargets(torch.zeros(3, 4), "world-pose")
    with pytest.raises(ShapeError, match="one LimbTargets per map, got 2 maps and 1 targets"):
        limb_accuracy(torch.zeros(2, 3, 20, 20), [LimbTargets(SEGMENTS, "world-pose")])
    with pytest.raises(ShapeError, match="expected a skeleton map"):
        limb_hits(torch.zeros(20, 20), SEGMENTS)
