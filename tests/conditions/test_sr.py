"""The built-in sr (super-resolution) condition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ccm_sdk import get_condition
from ccm_sdk.errors import InputError
from ccm_sdk.testing.conditions import ConditionTestBase, sample_photos


class TestSR(ConditionTestBase):
    condition_name = "sr"
    roundtrip_atol = 0.03  # bicubic down/up is close to, not exactly, idempotent


class TestSRNearestArea(ConditionTestBase):
    condition_name = "sr"
    condition_options = {"factor": 4, "upsample": "nearest", "downsample": "area"}
    roundtrip_atol = 1e-6  # box-averaging nearest-upsampled blocks gives the blocks back


@pytest.fixture(scope="module")
def photo():
    return sample_photos((128, 128), 1)


def test_default_factor_16_keeps_only_8x8_worth_of_information(photo):
    condition = get_condition("sr", upsample="nearest")
    out = condition(photo)
    assert out.shape == (1, 3, 128, 128)
    low = condition.low_resolution(photo)
    assert low.shape == (1, 3, 8, 8)
    # nearest upsampling: every 16x16 block is one constant colour from the 8x8 image
    torch.testing.assert_close(out, F.interpolate(low, size=(128, 128), mode="nearest"))


def test_area_downsampling_is_the_block_mean(photo):
    low = get_condition("sr", downsample="area", factor=16).low_resolution(photo)
    torch.testing.assert_close(low, F.avg_pool2d(photo, 16))


def test_bicubic_output_is_smooth_but_close_to_the_photo(photo):
    out = get_condition("sr", factor=4)(photo)
    assert (out - photo).abs().mean() < 0.08
    assert out.diff(dim=-1).abs().mean() < photo.diff(dim=-1).abs().mean()


def test_larger_factor_loses_more_detail(photo):
    error = [(get_condition("sr", factor=f)(photo) - photo).abs().mean() for f in (2, 8, 32)]
    assert error[0] < error[1] < error[2]


def test_factor_larger_than_the_image_gives_one_colour():
    image = sample_photos((12, 20), 1)
    out = get_condition("sr", factor=64, upsample="nearest", downsample="area")(image)
    torch.testing.assert_close(out, image.mean(dim=(2, 3), keepdim=True).expand_as(out))


def test_extract_degrades_the_generated_image_the_same_way(photo):
    condition = get_condition("sr", factor=8)
    generated = (photo + 0.05 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    # fine noise averages out: h(y) of a noisy version is near the control of the clean photo
    assert (condition.extract_from(generated) - condition(photo)).abs().mean() < 0.02


def test_factor_must_be_positive():
    with pytest.raises(InputError, match="factor"):
        get_condition("sr", factor=0)


def test_unknown_upsampling_mode_is_rejected():
    with pytest.raises(InputError, match="upsample"):
        get_condition("sr", upsample="lanczos")
