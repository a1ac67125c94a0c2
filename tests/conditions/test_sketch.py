"""The built-in sketch condition and its thinning helpers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ccm_sdk import get_condition
from ccm_sdk.conditions.opencv import drop_small_components, thin
from ccm_sdk.testing.conditions import ConditionTestBase, sample_photos


class TestSketch(ConditionTestBase):
    condition_name = "sketch"


@pytest.fixture(scope="module")
def photo():
    return sample_photos((192, 192), 1)


def test_white_strokes_on_black(photo):
    out = get_condition("sketch")(photo)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert 0.005 < out.mean() < 0.2  # mostly black background, some white strokes


def test_width_one_strokes_are_one_pixel_wide(photo):
    strokes = get_condition("sketch", stroke_width=1)(photo)[0, 0].numpy() > 0.5
    assert strokes.any()
    np.testing.assert_array_equal(thin(strokes), strokes)  # nothing left to thin


def test_stroke_width_thickens_the_same_strokes(photo):
    thin_map = get_condition("sketch", stroke_width=1)(photo)[0, 0].numpy() > 0.5
    thick_map = get_condition("sketch", stroke_width=5)(photo)[0, 0].numpy() > 0.5
    assert thick_map.sum() > 2 * thin_map.sum()
    assert thick_map[thin_map].all()  # thickening keeps every centre-line pixel


def test_more_detail_gives_more_strokes(photo):
    coarse = get_condition("sketch", detail=0.1)(photo).sum()
    fine = get_condition("sketch", detail=0.9)(photo).sum()
    assert fine > coarse


def test_short_fragments_are_dropped():
    image = np.zeros((128, 128, 3), np.uint8)
    cv2.rectangle(image, (20, 20), (100, 100), (255, 255, 255), -1)
    for x in range(10, 120, 12):  # specks: each gives a short closed edge
        image[116:120, x : x + 4] = 255
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    kept = get_condition("sketch", detail=1.0, stroke_width=1, min_fragment=30)(tensor)[0, 0]
    everything = get_condition("sketch", detail=1.0, stroke_width=1, min_fragment=0)(tensor)[0, 0]
    assert kept[60, 15:26].max() == 1  # the square's left side is a stroke
    assert kept[110:, :].max() == 0  # the specks are gone
    assert everything[110:, :].max() == 1


def test_flat_image_gives_no_strokes():
    assert get_condition("sketch")(torch.full((1, 3, 48, 48), 0.3)).max() == 0


def test_thinning_matches_scikit_image_on_photo_edges(photo):
    morphology = pytest.importorskip("skimage.morphology")
    gray = cv2.cvtColor((photo[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    blobs = cv2.dilate(cv2.Canny(gray, 30, 90), np.ones((3, 3), np.uint8)) > 0
    np.testing.assert_array_equal(thin(blobs), morphology.thin(blobs))


def test_thinning_keeps_a_line_through_a_filled_bar():
    bar = np.zeros((20, 40), bool)
    bar[8:13, 5:35] = True
    skeleton = thin(bar)
    assert skeleton.sum() >= 20 and (skeleton.sum(axis=0) <= 1).all()


def test_drop_small_components_counts_8_connected_pixels():
    binary = np.zeros((10, 10), bool)
    binary[0, 0] = binary[1, 1] = binary[2, 2] = True  # one diagonal component of 3
    binary[8, 8] = True
    kept = drop_small_components(binary, 3)
    assert kept[:3, :3].sum() == 3 and not kept[8, 8]
