"""Shape accuracy by hand (ccm_sdk.eval.shape)."""

from __future__ import annotations

import math

import pytest
import torch

from ccm_sdk.errors import ShapeError
from ccm_sdk.eval.shape import ShapeTargets, object_match, shape_accuracy, shape_hits

SIZE = 24


def _square(top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _plus(top: int, left: int, side: int) -> torch.Tensor:
    """A cross as wide as the square: a different shape at the same place."""
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    third = side // 3
    mask[top : top + side, left + third : left + side - third] = True
    mask[top + third : top + side - third, left : left + side] = True
    return mask


def _targets(asked: list[int]) -> ShapeTargets:
    """Two objects: at (3, 3) and (13, 13), each 8 px; candidates (square, plus); nothing occludes anything."""
    places = [(3, 3), (13, 13)]
    candidates = torch.stack([torch.stack([_square(t, l, 8), _plus(t, l, 8)]) for t, l in places])
    visible = torch.stack([candidates[k, asked[k]] for k in range(2)])
    allowed = torch.ones(2, SIZE, SIZE, dtype=torch.bool)
    return ShapeTargets(candidates, torch.tensor(asked), visible, allowed)


def _paint(masks: list[torch.Tensor]) -> torch.Tensor:
    image = torch.tensor([0.1, 0.6, 0.2])[:, None, None].expand(3, SIZE, SIZE).clone()
    for mask, colour in zip(masks, ([0.9, 0.2, 0.2], [0.2, 0.3, 0.9])):
        image[:, mask] = torch.tensor(colour)[:, None]
    return image


def test_an_image_painted_as_asked_scores_every_object_and_a_wrong_shape_misses():
    targets = _targets([0, 1])  # a square at the first place, a plus at the second
    assert shape_hits(_paint([_square(3, 3, 8), _plus(13, 13, 8)]), targets) == (2, 2)
    assert shape_hits(_paint([_plus(3, 3, 8), _plus(13, 13, 8)]), targets) == (1, 2)  # the first object is a plus, not a square
    assert shape_hits(_paint([_plus(3, 3, 8), _square(13, 13, 8)]), targets) == (0, 2)


def test_each_candidate_is_scored_by_iou_with_the_segment():
    targets = _targets([0, 1])
    iou = object_match(_paint([_square(3, 3, 8), _plus(13, 13, 8)]), targets.candidates[0], targets.visible[0], targets.allowed[0])
    assert iou[0] == 1.0 and iou[1] == pytest.approx(_plus(3, 3, 8).sum().item() / 64)


def test_the_asked_shape_must_reach_min_iou():
    targets = _targets([0, 1])
    shifted = _paint([_square(4, 4, 8), _plus(13, 13, 8)])  # the square a pixel off: IoU 49/79, the plus's 40/72
    assert shape_hits(shifted, targets) == (2, 2)
    assert shape_hits(shifted, targets, min_iou=0.7) == (1, 2)


def test_flat_and_noise_images_score_near_nothing():
    targets = [_targets([0, 1]), _targets([1, 0])]
    painted = torch.stack([_paint([_square(3, 3, 8), _plus(13, 13, 8)]), _paint([_plus(3, 3, 8), _square(13, 13, 8)])])
    assert shape_accuracy(painted, targets) == 1.0
    flat = painted.mean(dim=(2, 3), keepdim=True).expand_as(painted).contiguous()
    assert shape_accuracy(flat, targets) == 0.0
    noise = torch.rand(painted.shape, generator=torch.Generator().manual_seed(0))
    assert shape_accuracy(noise, targets) <= 0.5
    faint = _paint([_square(3, 3, 8), _plus(13, 13, 8)])
    faint[:, _square(3, 3, 8)] = torch.tensor([0.1, 0.6, 0.2 + 0.5 / 255])[:, None]  # half an 8-bit step off the background
    assert shape_hits(faint, targets[0]) == (1, 2)


def test_occluded_and_tiny_objects():
    targets = _targets([0, 1])
    # an object hidden but for 3 pixels is left out
    visible = targets.visible.clone()
    visible[1] = False
    visible[1, 13, 13:16] = True
    small = ShapeTargets(targets.candidates, targets.asked, visible, targets.allowed)
    assert shape_hits(_paint([_square(3, 3, 8), _plus(13, 13, 8)]), small) == (1, 1)
    # pixels that are not allowed (another object in front) do not count against the shape
    allowed = targets.allowed.clone()
    allowed[0, 3:11, 3:6] = False
    covered = ShapeTargets(targets.candidates, targets.asked, targets.visible & allowed, allowed)
    image = _paint([_square(3, 3, 8), _plus(13, 13, 8)])
    image[:, 3:11, 3:6] = torch.tensor([0.0, 0.0, 0.0])[:, None, None]  # something black covers the square's left
    assert shape_hits(image, covered) == (2, 2)


def test_no_objects_is_nan_and_shapes_are_checked():
    empty = ShapeTargets(torch.zeros(0, 2, SIZE, SIZE, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                         torch.zeros(0, SIZE, SIZE, dtype=torch.bool), torch.zeros(0, SIZE, SIZE, dtype=torch.bool))  # fmt: skip
    assert math.isnan(shape_accuracy(torch.zeros(1, 3, SIZE, SIZE), [empty]))
    with pytest.raises(ShapeError, match="expected candidates"):
        ShapeTargets(torch.zeros(2, SIZE, SIZE, dtype=torch.bool), torch.tensor([0]), torch.zeros(1, SIZE, SIZE), torch.zeros(1, SIZE, SIZE))
    with pytest.raises(ShapeError, match=r"expected an image \[3, 24, 24\], got \(3, 8, 8\)"):
        shape_hits(torch.zeros(3, 8, 8), _targets([0, 1]))
    with pytest.raises(ShapeError, match="one ShapeTargets per image, got 2 images and 1 targets"):
        shape_accuracy(torch.zeros(2, 3, SIZE, SIZE), [_targets([0, 1])])
