"""Conditions that read the world's edge ground truths back from an image, for Fidelity on the world.

The world paints every region in one flat colour (or a slow gradient), and any two colours that
touch differ by at least 44/255 in some channel (``vocabulary.min_contrast``). So a colour jump
between neighbouring pixels is a region boundary, and these extractors recover the dataset's
``canny`` and ``hed`` maps from the pixels alone, up to a pixel of shift at corners and thin
limbs where anti-aliasing blends a boundary (about 99% of pixels agree exactly). On photographs
they are crude gradient detectors; use canny and hed there.

Depth (layer order) and pose (the figures' skeletons) are not recoverable from the pixels by a
rule like this: ``world-depth`` and ``world-pose`` run small networks trained on the world to
predict those maps (``ccm_world.map_net``).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ccm_sdk.conditions.opencv import to_uint8_rgb
from ccm_sdk.interfaces import Condition, ConditionOptions

from . import render


class WorldEdgesOptions(ConditionOptions):
    threshold: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="a channel jump above this between neighbours is an edge"
    )


def _axis_edges(pixels: np.ndarray, axis: int, limit: float) -> np.ndarray:
    """Pixels whose jump to the next pixel along ``axis`` exceeds ``limit`` and is the largest of its run."""
    jumps = np.abs(np.diff(pixels, axis=axis)).max(axis=-1).astype(np.float32)  # between i and i + 1
    padding = [(0, 0), (0, 0)]
    padding[axis] = (1, 1)
    padded = np.pad(jumps, padding)
    count = jumps.shape[axis]
    previous, current, following = (np.take(padded, range(k, k + count), axis=axis) for k in range(3))
    keep = (current > limit) & (current >= previous) & (current > following)
    edges = np.zeros(pixels.shape[:2], bool)
    index = [slice(None), slice(None)]
    index[axis] = slice(0, count)
    edges[tuple(index)] = keep
    return edges


def colour_edges(image: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [H, W] in {0, 1}: where the colour jumps to the right or lower neighbour.

    A jump counts when some channel changes by more than ``threshold`` (in [0, 1] units) and it
    is the largest of its run along that axis: an anti-aliased boundary blends one pixel, and
    the larger of the two jumps around it marks the side that most of the pixel belongs to,
    which is where the ground truth (majority labels) puts the edge.
    """
    pixels = image.astype(np.int16)
    limit = threshold * 255.0
    return (_axis_edges(pixels, 1, limit) | _axis_edges(pixels, 0, limit)).astype(np.float32)


class WorldEdgesCondition(Condition):
    """One-pixel colour-boundary edges, white on black: the world's ``canny`` ground truth, read from pixels."""

    name = "world-edges"
    channels = 3
    Options = WorldEdgesOptions
    description = "colour-boundary edges of flat-colour scenes (the world's canny ground truth, from pixels)"

    def preprocess(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        maps = [colour_edges(image, self.options.threshold) for image in to_uint8_rgb(images)]
        return torch.from_numpy(np.stack(maps))[:, None].expand(-1, 3, -1, -1).contiguous().to(images.device)


class WorldSoftEdgesOptions(WorldEdgesOptions):
    sigma: float | None = Field(default=None, gt=0.0, description="blur in pixels; default 1 per 64 pixels of image")


class WorldSoftEdgesCondition(Condition):
    """The colour-boundary edges blurred as the world's ``hed`` ground truth is: HED-like soft edges."""

    name = "world-soft-edges"
    channels = 3
    Options = WorldSoftEdgesOptions
    description = "soft (blurred) colour-boundary edges of flat-colour scenes (the world's hed ground truth)"

    def preprocess(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        height, width = images.shape[-2:]
        sigma = self.options.sigma or render.default_soft_edge_sigma(height, width)
        maps = [
            render.soft_edge_map(colour_edges(image, self.options.threshold), sigma) for image in to_uint8_rgb(images)
        ]
        return torch.from_numpy(np.stack(maps))[:, None].expand(-1, 3, -1, -1).contiguous().to(images.device)


class WorldMapOptions(ConditionOptions):
    model: str | None = Field(default=None, description="a map-net folder, or world:<name> for a shipped one; None: the shipped one")


class _WorldMapCondition(Condition):
    """A control map predicted by one of the world's trained map nets (``ccm_world.map_net``)."""

    channels = 3
    Options = WorldMapOptions
    target = ""  # the map the net must predict
    default_model = ""

    def __init__(self, **options):
        super().__init__(**options)
        from ccm_sdk.errors import InputError
        from ccm_sdk.models.loading import resolve_model_path

        from .map_net import WorldMapNet

        what = f"world {self.target} net"
        self.net = WorldMapNet.from_pretrained(resolve_model_path(self.options.model or self.default_model, what=what), what=what)
        if self.net.config.target != self.target:
            raise InputError(f"{self.name} needs a net that predicts {self.target!r} maps; this one predicts {self.net.config.target!r}")

    def to(self, device: torch.device | str) -> _WorldMapCondition:
        self.net.to(device)
        return self

    @torch.no_grad()
    def preprocess(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        parameter = next(self.net.parameters())
        maps = self.net(images.to(parameter.device, parameter.dtype)).float().clamp(0, 1)
        return maps.expand(-1, 3, -1, -1).contiguous().to(images.device) if maps.shape[1] == 1 else maps.to(images.device)


class WorldDepthCondition(_WorldMapCondition):
    """The world's relative depth (layer order, near = bright), predicted by the world's trained depth net."""

    name = "world-depth"
    target, default_model = "depth", "world:depth-net"
    description = "layer-order depth of world scenes, from the world's trained depth net (h for depth Fidelity)"


class WorldPoseCondition(_WorldMapCondition):
    """The stick figures' OpenPose skeletons, predicted by the world's trained pose net."""

    name = "world-pose"
    target, default_model = "pose", "world:pose-net"
    description = "OpenPose skeletons of world stick figures, from the world's trained pose net (h for pose Fidelity)"


WORLD_CONDITION_CLASSES = (WorldEdgesCondition, WorldSoftEdgesCondition, WorldDepthCondition, WorldPoseCondition)
