"""Super-resolution condition: the image downsampled by a factor (16 by default) and brought back up."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..interfaces import Condition, ConditionOptions


class SROptions(ConditionOptions):
    factor: int = Field(default=16, ge=1, le=128, description="downsampling factor (16: 1024x1024 -> 64x64)")
    downsample: Literal["bicubic", "area"] = Field(
        default="bicubic", description="antialiased bicubic (the usual SR degradation) or box averaging"
    )
    upsample: Literal["bicubic", "nearest"] = Field(
        default="bicubic", description="how the low-res image is brought back"
    )


class SRCondition(Condition):
    """Low-resolution image at full size; h(y) applies the same degradation to the generated image."""

    name = "sr"
    channels = 3
    Options = SROptions
    description = "super-resolution: the image downsampled by `factor` (16) and upsampled back to its size"

    def low_resolution(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, round(H / factor), round(W / factor)] (at least 1x1)."""
        height, width = images.shape[-2:]
        factor = self.options.factor
        size = (max(1, round(height / factor)), max(1, round(width / factor)))
        if size == (height, width):
            return images
        if self.options.downsample == "area":
            return F.interpolate(images, size=size, mode="area")
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)

    def preprocess(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        low = self.low_resolution(images)
        size = tuple(images.shape[-2:])
        if self.options.upsample == "nearest":
            return F.interpolate(low, size=size, mode="nearest")
        return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
