"""Fidelity against hand-computed values: the general mean |h(y) - c|, the mask condition's unmasked-region rule, line F1."""

from __future__ import annotations

import math

import pytest
import torch

from ccm_sdk.conditions.mask import MaskCondition
from ccm_sdk.errors import ChannelMismatchError, ImageSizeError, InputError, ShapeError
from ccm_sdk.eval.fidelity import fidelity, fidelity_per_image, line_f1_per_image, line_scores
from ccm_sdk.interfaces import Condition


class Identity(Condition):
    """h(y) = y: Fidelity is then the mean absolute pixel difference."""

    name = "identity-for-test"

    def preprocess(self, images, **kwargs):
        return images


def test_mean_absolute_difference_over_channels_and_pixels():
    y = torch.zeros(2, 3, 2, 2)
    y[0] = 0.5
    y[1, 0] = 1.0  # one channel of four pixels at 1, the rest 0
    c = torch.full((2, 3, 2, 2), 0.25)
    values = fidelity_per_image(Identity(), y, c)
    # image 0: every element differs by 0.25; image 1: 4 elements by 0.75, 8 by 0.25 -> (3 + 2) / 12
    torch.testing.assert_close(values, torch.tensor([0.25, 5 / 12], dtype=torch.float64))
    assert fidelity(Identity(), y, c) == pytest.approx((0.25 + 5 / 12) / 2)
    assert fidelity(Identity(), y, c[:1]) == pytest.approx((0.25 + 5 / 12) / 2)  # one map for the batch


def test_registered_condition_by_name_is_zero_on_its_own_output():
    y = torch.rand(2, 3, 32, 32)
    assert fidelity("sr", y, __import__("ccm_sdk").get_condition("sr")(y)) == pytest.approx(0.0, abs=1e-7)


def test_mask_compares_only_the_unmasked_rgb():
    source = torch.zeros(1, 3, 2, 4)
    mask = torch.zeros(1, 1, 2, 4)
    mask[..., :2] = 1  # the left half is generated
    control = MaskCondition()(source, mask=mask)
    generated = torch.zeros(1, 3, 2, 4)
    generated[..., :2] = 1.0  # anything in the masked half is free
    generated[:, 0, :, 2:] = 0.6  # the kept half: one channel off by 0.6
    # unmasked RGB elements: 3 channels x 4 pixels = 12; error sum 0.6 x 4 -> 0.2
    assert fidelity("mask", generated, control) == pytest.approx(0.2)


def test_mask_covering_everything_is_left_out_and_alone_raises():
    source = torch.rand(2, 3, 4, 4)
    mask = torch.ones(2, 1, 4, 4)
    mask[1, :, 0, 0] = 0  # image 1 keeps one pixel
    control = MaskCondition()(source, mask=mask)
    generated = source.clone()
    generated[1, :, 0, 0] += 0.1
    values = fidelity_per_image("mask", generated.clamp(0, 1), control)
    assert math.isnan(values[0]) and values[1] > 0
    assert fidelity("mask", generated.clamp(0, 1), control) == pytest.approx(float(values[1]))
    with pytest.raises(InputError, match="no image has an unmasked pixel"):
        fidelity("mask", source[:1], control[:1])


def test_control_with_the_wrong_channels_or_size_raises():
    y = torch.rand(1, 3, 8, 8)
    with pytest.raises(ChannelMismatchError, match="4 channels"):
        fidelity("canny", y, torch.rand(1, 4, 8, 8))
    with pytest.raises(ImageSizeError):
        fidelity("canny", y, torch.rand(1, 3, 4, 4))


def _lines(*pixels, size=8):
    """A [1, 3, size, size] map with 1 at each (row, column) of ``pixels``."""
    m = torch.zeros(1, 3, size, size)
    for r, c in pixels:
        m[0, :, r, c] = 1.0
    return m


def test_line_scores_by_hand():
    line = [(2, c) for c in range(1, 7)]  # six pixels of a horizontal line
    c = _lines(*line)
    same = line_scores(c, c)
    assert same["precision"].item() == same["recall"].item() == same["f1"].item() == 1.0
    shifted = _lines(*[(3, col) for _, col in line])  # one pixel lower
    assert line_scores(shifted, c, tolerance=1)["f1"].item() == 1.0
    assert line_scores(shifted, c, tolerance=0)["f1"].item() == 0.0
    # three of the six drawn, plus three stray pixels far away: precision 3/6, recall 3/6
    half = _lines(*line[:3], (6, 0), (6, 1), (7, 7))
    scores = line_scores(half, c, tolerance=0)
    assert scores["precision"].item() == pytest.approx(0.5) and scores["recall"].item() == pytest.approx(0.5)
    assert scores["f1"].item() == pytest.approx(0.5)
    # an empty h(y) draws nothing wrong but misses everything; with no lines in c either, it is perfect
    empty = torch.zeros_like(c)
    nothing = line_scores(empty, c)
    assert (nothing["precision"].item(), nothing["recall"].item(), nothing["f1"].item()) == (1.0, 0.0, 0.0)
    assert line_scores(empty, empty)["f1"].item() == 1.0
    assert line_scores(c, empty)["f1"].item() == 0.0


def test_line_pixels_are_the_channel_mean_above_the_threshold():
    c = _lines((4, 4))
    faint = c.clone()
    faint[0, 1:] = 0  # one channel of three at 1: mean 1/3
    assert line_scores(faint, c, threshold=0.3)["f1"].item() == 1.0
    assert line_scores(faint, c, threshold=0.4)["f1"].item() == 0.0


def test_line_f1_of_a_condition_and_its_errors():
    c = _lines(*[(r, 3) for r in range(8)])
    y = c.clone()  # Identity: h(y) = y
    assert line_f1_per_image(Identity(), y, c).tolist() == [1.0]
    with pytest.raises(InputError, match="mask condition"):
        line_f1_per_image(MaskCondition(), torch.rand(1, 3, 8, 8), torch.rand(1, 4, 8, 8))
    with pytest.raises(ShapeError, match="one shape"):
        line_scores(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(InputError, match="threshold"):
        line_scores(c, c, threshold=1.5)
