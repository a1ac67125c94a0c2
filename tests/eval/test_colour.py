"""Colour accuracy by hand (ccm_sdk.eval.colour)."""

from __future__ import annotations

import math

import pytest
import torch

from ccm_sdk.errors import ShapeError
from ccm_sdk.eval.colour import ColourTargets, colour_accuracy, region_hits

PALETTE = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _targets(asked):
    regions = torch.zeros(8, 8, dtype=torch.long)
    regions[2:6, 2:6] = 1  # 16 pixels
    regions[0, 0] = 2  # one pixel: too small to score
    return ColourTargets(regions, torch.tensor(asked), PALETTE)


def _paint(background, square):
    image = PALETTE[background][:, None, None].expand(3, 8, 8).clone()
    image[:, 2:6, 2:6] = PALETTE[square][:, None, None]
    return image


def test_each_region_is_judged_by_its_mean_colour():
    targets = _targets([0, 2, 1])
    assert region_hits(_paint(0, 2), targets) == (2, 2)  # region 2 (one pixel) is left out
    assert region_hits(_paint(0, 1), targets) == (1, 2)
    assert region_hits(_paint(1, 1), targets) == (0, 2)
    noisy = _paint(0, 2) * 0.7 + 0.1  # darker and greyer, still nearest the asked colours
    assert region_hits(noisy, targets) == (2, 2)
    right, scored = region_hits(_paint(0, 2), targets, min_pixels=1)
    assert scored == 3 and right == 2  # the lone pixel at (0, 0) is red, region 2 asks green


def test_accuracy_pools_regions_over_images():
    images = torch.stack([_paint(0, 2), _paint(0, 1)])
    assert colour_accuracy(images, [_targets([0, 2, 1])] * 2) == pytest.approx(3 / 4)
    empty = ColourTargets(torch.zeros(8, 8, dtype=torch.long), torch.tensor([0]), PALETTE)
    assert math.isnan(colour_accuracy(images[:1], [empty], min_pixels=100))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ColourTargets(torch.zeros(8, dtype=torch.long), torch.tensor([0]), PALETTE), "regions"),
        (lambda: ColourTargets(torch.zeros(8, 8, dtype=torch.long), torch.tensor([0]), torch.zeros(3, 4)), "palette"),
        (lambda: region_hits(torch.zeros(3, 4, 4), _targets([0, 1, 2])), r"\[3, 8, 8\]"),
        (lambda: colour_accuracy(torch.zeros(2, 3, 8, 8), [_targets([0, 1, 2])]), "one ColourTargets per image"),
    ],
)
def test_bad_shapes_are_named(call, match):
    with pytest.raises(ShapeError, match=match):
        call()
