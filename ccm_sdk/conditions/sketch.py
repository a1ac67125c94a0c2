"""Sketch: edges simplified into thin, clean strokes (white on black, like ControlNet scribble maps)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from pydantic import Field

from ..interfaces import Condition, ConditionOptions
from .opencv import drop_small_components, maps_to_tensor, thin, to_uint8_rgb


class SketchOptions(ConditionOptions):
    detail: float = Field(
        default=0.5, ge=0.0, le=1.0, description="0: only the main contours, 1: fine texture lines too"
    )
    stroke_width: int = Field(default=2, ge=1, le=16, description="stroke width in pixels at detect resolution")
    min_fragment: int | None = Field(
        default=None, ge=0, description="drop strokes shorter than this many pixels (default: from detail and size)"
    )


class SketchCondition(Condition):
    """Canny on a smoothed image, gaps closed, thinned to 1 px, short fragments dropped, then thickened."""

    name = "sketch"
    channels = 3
    Options = SketchOptions
    description = "simplified edges as thin clean strokes, white on black (scribble-style)"

    def preprocess(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        return maps_to_tensor([self.sketch(image) for image in to_uint8_rgb(images)], device=images.device)

    def sketch(self, image: np.ndarray) -> np.ndarray:
        """One uint8 RGB image [H, W, 3] -> uint8 stroke map [H, W] (0 or 255)."""
        o = self.options
        coarseness = 1.0 - o.detail
        # 1. smooth away texture: the less detail, the wider the blur
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        gray = cv2.GaussianBlur(gray, (0, 0), sigmaX=0.8 + 2.4 * coarseness)
        # 2. Canny with thresholds relative to this image's gradients, so that contrast does not
        #    decide how many strokes survive; a floor keeps flat images empty instead of noisy
        gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
        magnitude = cv2.magnitude(gx, gy)
        high = max(float(np.quantile(magnitude, 0.86 + 0.11 * coarseness)), 40.0)
        edges = cv2.Canny(gray, 0.4 * high, high, L2gradient=True)
        # 3. merge doubled and broken edges into one blob per stroke, then thin it to its centre line
        edges = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
        strokes = thin(edges > 0)
        # 4. drop short fragments (texture, noise); the default length scales with the image
        min_fragment = o.min_fragment
        if min_fragment is None:
            min_fragment = round((4 + 36 * coarseness) * min(image.shape[:2]) / 512)
        strokes = drop_small_components(strokes, min_fragment)
        out = strokes.astype(np.uint8) * 255
        if o.stroke_width > 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (o.stroke_width, o.stroke_width))
            out = cv2.dilate(out, kernel)
        return out
