"""Inpainting condition: 4 channels, the masked RGB image plus the binary mask (1 = generate).

diffusers' inpaint ControlNet (control_v11p_sd15_inpaint) marks masked pixels with -1, a value no
real colour has. Control maps here live in [0, 1], where no such value exists, so masked pixels
are set to 0 and the fourth channel says which zeros are masked; ``to_diffusers_inpaint`` turns a
map back into diffusers' 3-channel -1 convention for that ControlNet.

Fidelity: h(y) is this same map built from the generated image with the same mask, so
||h(y) - c||_1 compares the generated image with the source only where the mask is 0
(masked pixels are 0 in both and the mask channels are equal).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from pydantic import Field

from .. import images as image_utils
from ..errors import ImageSizeError, InputError, ShapeError
from ..interfaces import Condition, ConditionOptions


class MaskOptions(ConditionOptions):
    mask_threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="mask values above this are masked")


class MaskCondition(Condition):
    """Masked RGB (masked pixels 0) + binary mask; needs ``mask=`` (1 = region to generate)."""

    name = "mask"
    channels = 4
    Options = MaskOptions
    description = "inpainting: masked RGB (masked pixels 0) plus the binary mask as a 4th channel"

    def preprocess(self, images: torch.Tensor, *, mask=None, **kwargs) -> torch.Tensor:
        """``mask``: PIL/np/tensor, one for the batch or one per image; a 4-channel map of this condition works too.

        A mask with no masked pixel is valid: the map is then the whole image with a zero mask channel.
        """
        binary = self.binary_mask(mask, images)
        return torch.cat([images * (1.0 - binary), binary], dim=1)

    def binary_mask(self, mask, images: torch.Tensor) -> torch.Tensor:
        """Any supported mask -> float {0, 1} tensor [B, 1, H, W] matching ``images``."""
        if mask is None:
            raise InputError(
                "the 'mask' condition needs mask=... (1 = region to generate); "
                "ccm_sdk.conditions.mask.random_masks makes training masks"
            )
        tensor = image_utils.to_tensor(mask, channels=(1, 3, 4)).to(images.device)
        if tensor.shape[1] == 4:  # a control map of this condition: its last channel is the mask
            tensor = tensor[:, 3:]
        elif tensor.shape[1] == 3:
            tensor = tensor.mean(dim=1, keepdim=True)
        batch, (height, width) = images.shape[0], images.shape[-2:]
        if tensor.shape[0] not in (1, batch):
            raise ShapeError(f"expected 1 or {batch} masks for {batch} images, got {tensor.shape[0]}")
        mask_h, mask_w = tensor.shape[-2:]
        if abs(mask_h / mask_w - height / width) > 0.02 * height / width:
            raise ImageSizeError(
                f"mask size {(mask_h, mask_w)} does not match the image's aspect ratio {(height, width)}"
            )
        tensor = image_utils.resize(tensor, (height, width), mode="nearest")
        return (tensor > self.options.mask_threshold).float().expand(batch, -1, -1, -1)


def to_diffusers_inpaint(control: torch.Tensor) -> torch.Tensor:
    """A 4-channel mask control map -> diffusers' 3-channel inpaint ControlNet image (masked = -1)."""
    if control.ndim != 4 or control.shape[1] != 4:
        raise ShapeError(f"expected a mask control map [B, 4, H, W], got {tuple(control.shape)}")
    return torch.where(control[:, 3:] > 0.5, torch.full_like(control[:, :3], -1.0), control[:, :3])


def random_masks(
    batch: int,
    height: int,
    width: int,
    *,
    seed: int | np.random.Generator | None = None,
    max_boxes: int = 3,
    max_strokes: int = 4,
    coverage: Sequence[float] = (0.1, 0.6),
) -> torch.Tensor:
    """Seeded training masks [B, 1, H, W] in {0, 1}: random boxes plus free-form brush strokes.

    Each mask gets 0..max_boxes boxes and 0..max_strokes strokes (at least one shape), and is
    redrawn until its masked fraction lies within ``coverage`` (the last try is kept after 20).
    """
    if batch < 1 or height < 2 or width < 2:
        raise ShapeError(f"expected batch >= 1 and size >= 2x2, got batch={batch}, size={(height, width)}")
    low, high = coverage
    if not 0.0 <= low < high <= 1.0:
        raise InputError(f"expected coverage (low, high) with 0 <= low < high <= 1, got {tuple(coverage)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    masks = []
    for _ in range(batch):
        for _attempt in range(20):
            mask = _one_mask(rng, height, width, max_boxes, max_strokes)
            if low <= mask.mean() <= high:
                break
        masks.append(mask)
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


def _one_mask(rng: np.random.Generator, height: int, width: int, max_boxes: int, max_strokes: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    n_boxes = int(rng.integers(0, max_boxes + 1))
    n_strokes = int(rng.integers(0 if n_boxes else 1, max_strokes + 1))
    for _ in range(n_boxes):
        box_h = int(rng.integers(max(1, height // 10), max(2, height // 2)))
        box_w = int(rng.integers(max(1, width // 10), max(2, width // 2)))
        top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
        mask[top : top + box_h, left : left + box_w] = 1
    short = min(height, width)
    for _ in range(n_strokes):
        # a brush dragged along a random walk, as in DeepFill v2's free-form masks
        thickness = int(rng.integers(max(1, short // 40), max(2, short // 10)))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        angle = float(rng.uniform(0, 2 * np.pi))
        for _ in range(int(rng.integers(2, 8))):
            angle += float(rng.uniform(-np.pi / 2, np.pi / 2))
            length = float(rng.uniform(short / 10, short / 3))
            nx = float(np.clip(x + length * np.cos(angle), 0, width - 1))
            ny = float(np.clip(y + length * np.sin(angle), 0, height - 1))
            cv2.line(mask, (round(x), round(y)), (round(nx), round(ny)), 1, thickness)
            x, y = nx, ny
    return mask
