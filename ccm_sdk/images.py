"""Conversions between PIL images, numpy arrays and tensors, with checks at the boundary.

The SDK's internal image format is a float32 tensor [B, C, H, W] with values in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .errors import ChannelMismatchError, DTypeError, ImageSizeError, InputTypeError, NonFiniteError, ShapeError, ValueRangeError

ImageLike = Image.Image | np.ndarray | torch.Tensor
OutputType = Literal["pil", "np", "pt"]

_RANGE_SLACK = 1e-3  # tolerate float rounding just outside [0, 1]


def _pil_to_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I"):
        return np.asarray(image).astype(np.float32) / 65535.0
    if image.mode == "F":
        return np.asarray(image).astype(np.float32)
    if image.mode not in ("RGB", "RGBA", "L"):
        has_alpha = "A" in image.mode or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    return np.asarray(image).astype(np.float32) / 255.0


def _array_to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif array.dtype.kind == "f":
        array = array.astype(np.float32, copy=False)
    elif array.dtype == np.bool_:
        array = array.astype(np.float32)
    else:
        raise DTypeError(f"expected a uint8, uint16, bool or float image array, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        array = array[None]
    elif array.ndim != 4:
        raise ShapeError(f"expected an image array [H,W], [H,W,C] or [B,H,W,C], got shape {tuple(array.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def to_tensor(image: ImageLike | Sequence[ImageLike], *, channels: int | Sequence[int] | None = None) -> torch.Tensor:
    """Any supported image (or list of them) -> float32 tensor [B, C, H, W] in [0, 1].

    uint8 arrays are scaled by 1/255; float arrays and tensors must already lie in [0, 1].
    Tensors may be [C,H,W] or [B,C,H,W]; arrays [H,W], [H,W,C] or [B,H,W,C].
    ``channels`` checks the channel count (an int, or the accepted counts).
    """
    if isinstance(image, (list, tuple)):
        if not image:
            raise ShapeError("expected at least one image, got an empty list")
        parts = [to_tensor(item, channels=channels) for item in image]
        sizes = {tuple(p.shape[1:]) for p in parts}
        if len(sizes) > 1:
            raise ImageSizeError(f"images in one batch must share channels and size, got {sorted(sizes)}")
        return torch.cat(parts)
    if isinstance(image, Image.Image):
        tensor = _array_to_tensor(_pil_to_array(image))
    elif isinstance(image, np.ndarray):
        tensor = _array_to_tensor(image)
    elif isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            tensor = image.float() / 255.0
        elif image.is_floating_point():
            tensor = image.float()
        elif image.dtype == torch.bool:
            tensor = image.float()
        else:
            raise DTypeError(f"expected a float, uint8 or bool image tensor, got {image.dtype}")
        if tensor.ndim == 3:
            tensor = tensor[None]
        elif tensor.ndim != 4:
            raise ShapeError(f"expected an image tensor [C,H,W] or [B,C,H,W], got shape {tuple(image.shape)}")
    else:
        raise InputTypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    check_image_tensor(tensor, channels=channels)
    return tensor


def check_image_tensor(tensor: torch.Tensor, *, channels: int | Sequence[int] | None = None, name: str = "image") -> None:
    """Raise a typed error unless ``tensor`` is a finite [B,C,H,W] image in [0, 1]."""
    if tensor.ndim != 4:
        raise ShapeError(f"expected {name} of shape [B,C,H,W], got {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[2] == 0 or tensor.shape[3] == 0:
        raise ImageSizeError(f"{name} is empty: shape {tuple(tensor.shape)}")
    if channels is not None:
        accepted = (channels,) if isinstance(channels, int) else tuple(channels)
        if tensor.shape[1] not in accepted:
            raise ChannelMismatchError(
                f"expected {name} with {' or '.join(map(str, accepted))} channels, got {tensor.shape[1]}"
            )
    low_t, high_t = torch.aminmax(tensor)  # one pass; NaN/inf propagate into min or max
    low, high = float(low_t), float(high_t)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise ValueRangeError(f"expected {name} values in [0, 1], got [{low:.4g}, {high:.4g}]")


def to_rgb(tensor: torch.Tensor) -> torch.Tensor:
    """Grayscale -> RGB by repetition, RGBA -> RGB by dropping alpha; RGB unchanged."""
    channels = tensor.shape[1]
    if channels == 3:
        return tensor
    if channels == 1:
        return tensor.expand(-1, 3, -1, -1).contiguous()
    if channels == 4:
        return tensor[:, :3].contiguous()
    raise ChannelMismatchError(f"expected an image with 1, 3 or 4 channels, got {channels}")


def from_tensor(tensor: torch.Tensor, output_type: OutputType = "pil") -> list[Image.Image] | np.ndarray | torch.Tensor:
    """[B,C,H,W] in [0,1] -> list of PIL images, a float [B,H,W,C] array, or the tensor itself."""
    if output_type == "pt":
        return tensor
    array = tensor.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        as_uint8 = (array * 255).round().astype(np.uint8)
        if as_uint8.shape[-1] == 1:
            return [Image.fromarray(a[..., 0], mode="L") for a in as_uint8]
        return [Image.fromarray(a) for a in as_uint8]
    raise ValueError(f"expected output_type 'pil', 'np' or 'pt', got {output_type!r}")


def resize(tensor: torch.Tensor, size: tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """Resize [B,C,H,W] to (height, width); antialiased when shrinking."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    if mode == "nearest":
        return torch.nn.functional.interpolate(tensor, size=size, mode="nearest")
    shrinking = size[0] < tensor.shape[-2] or size[1] < tensor.shape[-1]
    return torch.nn.functional.interpolate(tensor, size=size, mode=mode, align_corners=False, antialias=shrinking)


def make_grid(images: Sequence[Image.Image], *, columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile PIL images (of any sizes) into one grid image, row by row."""
    if not images:
        raise ShapeError("make_grid needs at least one image")
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (columns * cell_w + (columns + 1) * pad, rows * cell_h + (rows + 1) * pad), "white")
    for index, im in enumerate(images):
        r, c = divmod(index, columns)
        grid.paste(im.convert("RGB"), (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    return grid
