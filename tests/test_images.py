"""Image conversion at the boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk import images
from ccm_sdk.errors import DTypeError, ImageSizeError, InputTypeError, NonFiniteError, ShapeError, ValueRangeError


def test_pil_numpy_tensor_agree():
    array = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    a = images.to_tensor(Image.fromarray(array))
    b = images.to_tensor(array)
    c = images.to_tensor(torch.from_numpy(array).permute(2, 0, 1))
    assert a.shape == (1, 3, 4, 5) and torch.equal(a, b) and torch.equal(b, c)
    assert a.dtype == torch.float32 and float(a.max()) == pytest.approx(59 / 255)


def test_modes_and_channels():
    assert images.to_tensor(Image.new("L", (3, 2))).shape == (1, 1, 2, 3)
    assert images.to_tensor(Image.new("RGBA", (3, 2))).shape == (1, 4, 2, 3)
    assert images.to_tensor(Image.new("P", (3, 2))).shape == (1, 3, 2, 3)
    assert images.to_rgb(images.to_tensor(Image.new("L", (3, 2), 128))).shape == (1, 3, 2, 3)
    assert images.to_rgb(torch.zeros(1, 4, 2, 2)).shape == (1, 3, 2, 2)


def test_lists_batch_and_must_share_size():
    batch = images.to_tensor([np.zeros((4, 4, 3), np.uint8)] * 3)
    assert batch.shape == (3, 3, 4, 4)
    with pytest.raises(ImageSizeError, match="share channels and size"):
        images.to_tensor([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])
    with pytest.raises(ShapeError, match="empty list"):
        images.to_tensor([])


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.full((1, 3, 2, 2), float("inf")), NonFiniteError, "NaN or infinite"),
        (torch.full((1, 3, 2, 2), 2.0), ValueRangeError, r"\[0, 1\], got \[2, 2\]"),
        (torch.zeros(1, 3, 0, 4), ImageSizeError, "empty"),
        (torch.zeros(2, 2), ShapeError, r"\[C,H,W\] or \[B,C,H,W\]"),
        (np.zeros((2, 2), dtype=np.int64), DTypeError, "int64"),
        ("image.png", InputTypeError, "got str"),
    ],
)
def test_bad_images(bad, error, message):
    with pytest.raises(error, match=message):
        images.to_tensor(bad)


def test_channel_check():
    from ccm_sdk.errors import ChannelMismatchError

    with pytest.raises(ChannelMismatchError, match="expected image with 3 channels, got 2"):
        images.to_tensor(torch.zeros(1, 2, 4, 4), channels=3)


def test_from_tensor_and_grid():
    tensor = torch.rand(2, 3, 4, 6)
    pil = images.from_tensor(tensor, "pil")
    assert len(pil) == 2 and pil[0].size == (6, 4)
    assert images.from_tensor(tensor, "np").shape == (2, 4, 6, 3)
    grid = images.make_grid(pil, columns=1, pad=1)
    assert grid.size == (8, 11)
