"""Canny edges, as ControlNet's canny annotator computes them."""

from __future__ import annotations

from typing import Literal

import cv2
import torch
from pydantic import Field, model_validator

from ..interfaces import Condition, ConditionOptions
from .opencv import maps_to_tensor, to_uint8_rgb


class CannyOptions(ConditionOptions):
    low_threshold: float = Field(default=100.0, ge=0, description="hysteresis low threshold on the gradient magnitude")
    high_threshold: float = Field(
        default=200.0, ge=0, description="hysteresis high threshold on the gradient magnitude"
    )
    aperture_size: Literal[3, 5, 7] = Field(default=3, description="Sobel kernel size")
    l2_gradient: bool = Field(default=False, description="use the L2 gradient norm instead of L1")

    @model_validator(mode="after")
    def _thresholds_ordered(self):
        if self.low_threshold > self.high_threshold:
            raise ValueError(
                f"low_threshold ({self.low_threshold}) must not exceed high_threshold ({self.high_threshold})"
            )
        return self


class CannyCondition(Condition):
    """White Canny edges on black, 3 channels; h(y) is the same detector."""

    name = "canny"
    channels = 3
    Options = CannyOptions
    description = "Canny edges (OpenCV, on the RGB image as ControlNet does), white on black"

    def preprocess(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        o = self.options
        # OpenCV's Canny on a 3-channel image takes the strongest channel gradient per pixel,
        # which is what ControlNet's annotator feeds it (the RGB image, not grayscale).
        edges = [
            cv2.Canny(image, o.low_threshold, o.high_threshold, apertureSize=o.aperture_size, L2gradient=o.l2_gradient)
            for image in to_uint8_rgb(images)
        ]
        return maps_to_tensor(edges, device=images.device)
