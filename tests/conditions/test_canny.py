"""The built-in canny condition."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ccm_sdk import get_condition
from ccm_sdk.errors import InputError
from ccm_sdk.testing.conditions import ConditionTestBase, sample_photos


class TestCanny(ConditionTestBase):
    condition_name = "canny"


def test_matches_opencv_canny_on_a_photo():
    photo = sample_photos((128, 128), 1)
    rgb = (photo[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    expected = cv2.Canny(rgb, 50, 150) / 255.0
    out = get_condition("canny", low_threshold=50, high_threshold=150)(photo)
    assert torch.equal(out[0, 0], torch.from_numpy(expected).float())
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])
    assert 0.02 < out.mean() < 0.3  # a real photo has edges, but far from everywhere


def test_higher_thresholds_give_fewer_edges():
    photo = sample_photos((96, 96), 1)
    loose = get_condition("canny", low_threshold=20, high_threshold=40)(photo).sum()
    strict = get_condition("canny", low_threshold=150, high_threshold=300)(photo).sum()
    assert strict < loose


def test_flat_image_has_no_edges():
    assert get_condition("canny")(torch.full((1, 3, 32, 32), 0.5)).max() == 0


def test_low_threshold_above_high_is_rejected():
    with pytest.raises(InputError, match="low_threshold"):
        get_condition("canny", low_threshold=300, high_threshold=100)


def test_aperture_size_must_be_3_5_or_7():
    with pytest.raises(InputError, match="aperture_size"):
        get_condition("canny", aperture_size=4)
