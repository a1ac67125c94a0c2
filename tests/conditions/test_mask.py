"""The built-in mask (inpainting) condition and its random training masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk import get_condition
from ccm_sdk.conditions.mask import random_masks, to_diffusers_inpaint
from ccm_sdk.errors import ChannelMismatchError, ImageSizeError, InputError, ShapeError
from ccm_sdk.testing.conditions import ConditionTestBase, sample_photos


def box_mask(height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 4 : height // 2 + 1, width // 3 : 2 * width // 3 + 1] = 1
    return mask


class TestMask(ConditionTestBase):
    condition_name = "mask"
    roundtrip_atol = 1e-6  # re-masking a masked image changes nothing

    def call_kwargs(self, images):
        return {"mask": box_mask(*images.shape[-2:])}


@pytest.fixture(scope="module")
def photo():
    return sample_photos((64, 96), 1)


def test_layout_masked_rgb_then_mask(photo):
    mask = box_mask(64, 96)
    out = get_condition("mask")(photo, mask=mask)
    assert out.shape == (1, 4, 64, 96)
    torch.testing.assert_close(out[:, 3:], mask)
    assert (out[:, :3][mask.expand(-1, 3, -1, -1) > 0] == 0).all()
    keep = mask.expand(-1, 3, -1, -1) == 0
    torch.testing.assert_close(out[:, :3][keep], photo[keep])


def test_mask_accepts_pil_numpy_and_soft_values(photo):
    mask = box_mask(64, 96)
    expected = get_condition("mask")(photo, mask=mask)
    pil = Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8), mode="L")
    torch.testing.assert_close(get_condition("mask")(photo, mask=pil), expected)
    soft = mask[0, 0].numpy() * 0.8 + 0.1  # 0.1 outside, 0.9 inside: binarised at 0.5
    torch.testing.assert_close(get_condition("mask")(photo, mask=soft), expected)


def test_mask_at_another_resolution_is_resized(photo):
    small = box_mask(64, 96)[..., ::2, ::2]
    out = get_condition("mask")(photo, mask=small)
    assert out.shape == (1, 4, 64, 96)
    assert 0.05 < out[:, 3].mean() < 0.3


def test_mask_of_another_aspect_ratio_is_rejected(photo):
    with pytest.raises(ImageSizeError, match="aspect"):
        get_condition("mask")(photo, mask=torch.ones(1, 1, 64, 64))


def test_missing_mask_is_an_input_error(photo):
    with pytest.raises(InputError, match="mask="):
        get_condition("mask")(photo)


def test_mask_with_no_masked_pixels_keeps_the_whole_image(photo):
    out = get_condition("mask")(photo, mask=torch.zeros(1, 1, 64, 96))
    torch.testing.assert_close(out[:, :3], photo)
    assert out[:, 3].max() == 0


def test_fully_masked_image_is_all_black_with_full_mask(photo):
    out = get_condition("mask")(photo, mask=torch.ones(1, 1, 64, 96))
    assert out[:, :3].max() == 0 and out[:, 3].min() == 1


def test_mask_count_must_match_batch():
    images = sample_photos((32, 48), 2)
    with pytest.raises(ShapeError, match="masks"):
        get_condition("mask")(images, mask=torch.zeros(3, 1, 32, 48))


def test_mask_with_two_channels_is_rejected(photo):
    with pytest.raises(ChannelMismatchError):
        get_condition("mask")(photo, mask=torch.zeros(1, 2, 64, 96))


def test_control_map_can_serve_as_the_mask(photo):
    control = get_condition("mask")(photo, mask=box_mask(64, 96))
    torch.testing.assert_close(get_condition("mask")(photo, mask=control), control)


def test_fidelity_counts_only_the_unmasked_region(photo):
    mask = box_mask(64, 96)
    condition = get_condition("mask")
    control = condition(photo, mask=mask)
    changed_inside = photo * (1 - mask) + torch.rand_like(photo) * mask
    assert (condition.extract_from(changed_inside, mask=mask) - control).abs().sum() == 0
    changed_outside = photo.clone()
    changed_outside[..., 0, 0] = 1 - changed_outside[..., 0, 0]
    assert (condition.extract_from(changed_outside, mask=mask) - control).abs().sum() > 0


def test_to_diffusers_inpaint_marks_masked_pixels_with_minus_one(photo):
    mask = box_mask(64, 96)
    image = to_diffusers_inpaint(get_condition("mask")(photo, mask=mask))
    assert image.shape == (1, 3, 64, 96)
    assert (image[mask.expand(-1, 3, -1, -1) > 0] == -1).all()
    keep = mask.expand(-1, 3, -1, -1) == 0
    torch.testing.assert_close(image[keep], photo[keep])
    with pytest.raises(ShapeError):
        to_diffusers_inpaint(photo)


def test_random_masks_are_seeded_binary_and_varied():
    first = random_masks(4, 64, 96, seed=3)
    assert first.shape == (4, 1, 64, 96)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(first, random_masks(4, 64, 96, seed=3))
    assert not torch.equal(first, random_masks(4, 64, 96, seed=4))
    assert not torch.equal(first[0], first[1])
    coverage = first.mean(dim=(1, 2, 3))
    assert (coverage > 0).all() and (coverage < 1).all()


def test_random_masks_respect_coverage_bounds():
    masks = random_masks(16, 64, 64, seed=0, coverage=(0.2, 0.5))
    coverage = masks.mean(dim=(1, 2, 3))
    assert ((coverage >= 0.2) & (coverage <= 0.5)).float().mean() >= 0.75  # redrawn up to 20 times


def test_random_masks_reject_bad_arguments():
    with pytest.raises(ShapeError):
        random_masks(0, 64, 64)
    with pytest.raises(InputError, match="coverage"):
        random_masks(1, 64, 64, coverage=(0.6, 0.2))
