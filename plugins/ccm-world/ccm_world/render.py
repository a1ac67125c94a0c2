"""Rendering a scene: the RGB image and the exact ground truth of every condition.

Everything is drawn into a label raster ``supersample`` times larger than the image and
box-averaged down, which anti-aliases the image (and the depth and sketch maps) for free.
Maps are float32 [H, W] or [H, W, C] in [0, 1], rounded to the 1/255 grid so that PNG files
hold them exactly.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .scene import Person, Scene, label_map
from .vocabulary import PALETTE, gradient_end


def quantize(array: np.ndarray) -> np.ndarray:
    """Round to the uint8 grid (k / 255), as float32."""
    return (np.rint(np.clip(array, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def box_downsample(array: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks of [H*f, W*f, ...] -> [H, W, ...]."""
    if factor == 1:
        return array.astype(np.float32)
    h, w = array.shape[0] // factor, array.shape[1] // factor
    blocks = array.reshape(h, factor, w, factor, *array.shape[2:]).astype(np.float32)
    return blocks.mean(axis=(1, 3))


def majority_labels(labels_ss: np.ndarray, factor: int, count: int) -> np.ndarray:
    """Per output pixel, the label covering most of it (ties go to the front-most)."""
    if factor == 1:
        return labels_ss.copy()
    h, w = labels_ss.shape[0] // factor, labels_ss.shape[1] // factor
    blocks = labels_ss.reshape(h, factor, w, factor)
    votes = np.stack([(blocks == k).sum(axis=(1, 3)) for k in range(count)])
    votes = votes * (count + 1) + np.arange(count)[:, None, None]  # break ties towards higher labels
    return votes.argmax(axis=0).astype(np.uint8)


def background_field(scene: Scene, scale: int) -> np.ndarray:
    """float32 [H*scale, W*scale, 3] in [0, 1]: the plain colour, or a linear gradient to ``gradient_end``."""
    bg = scene.background
    h, w = scene.height * scale, scene.width * scale
    start = np.asarray(PALETTE[bg.color], np.float32) / 255.0
    if not bg.gradient:
        return np.broadcast_to(start, (h, w, 3)).copy()
    end = np.asarray(gradient_end(PALETTE[bg.color]), np.float32) / 255.0
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = np.array([math.cos(math.radians(bg.angle)), math.sin(math.radians(bg.angle))], np.float32)
    projection = ((xs + 0.5) / scale - scene.width / 2) * direction[0] + ((ys + 0.5) / scale - scene.height / 2) * direction[1]
    half_span = 0.5 * (abs(direction[0]) * scene.width + abs(direction[1]) * scene.height)
    t = np.clip(projection / (2 * half_span) + 0.5, 0.0, 1.0)[..., None]
    return start * (1 - t) + end * t


def render_image(scene: Scene, labels_ss: np.ndarray, scale: int) -> np.ndarray:
    """float32 [H, W, 3]: the scene's colours, anti-aliased."""
    field = background_field(scene, scale)
    for index, obj in enumerate(scene.objects):
        field[labels_ss == index + 1] = np.asarray(PALETTE[obj.color], np.float32) / 255.0
    return quantize(box_downsample(field, scale))


def edge_map(labels: np.ndarray) -> np.ndarray:
    """float32 [H, W] in {0, 1}: 1 where a pixel's label differs from its right or lower neighbour.

    One pixel wide, like Canny's edges: every visible boundary, so occluded outlines are absent.
    """
    edges = np.zeros(labels.shape, bool)
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edges[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edges.astype(np.float32)


def sketch_map(labels_ss: np.ndarray, scale: int, stroke_width: float = 1.0) -> np.ndarray:
    """float32 [H, W]: the visible outlines as anti-aliased strokes ``stroke_width`` output pixels wide."""
    boundary = (edge_map(labels_ss) * 255).astype(np.uint8)
    width = max(1, int(round(stroke_width * scale)))
    if width > 1:
        boundary = cv2.dilate(boundary, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
    return quantize(box_downsample(boundary.astype(np.float32) / 255.0, scale))


def soft_edge_map(edges: np.ndarray, sigma: float) -> np.ndarray:
    """HED-like soft edges: ``edges`` Gaussian-blurred and scaled so a straight 1-px line peaks at 1."""
    radius = max(1, int(math.ceil(3 * sigma)))
    kernel = cv2.getGaussianKernel(2 * radius + 1, sigma)
    blurred = cv2.sepFilter2D(edges.astype(np.float32), -1, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return quantize(blurred / float(kernel[radius, 0]))


def default_soft_edge_sigma(height: int, width: int) -> float:
    """1 pixel at 64 px, growing with the image."""
    return max(0.5, min(height, width) / 64.0)


def depth_map(scene: Scene, labels_ss: np.ndarray, scale: int) -> np.ndarray:
    """float32 [H, W]: background 0, object k of n at (k + 1) / n (later = nearer = brighter), anti-aliased."""
    count = len(scene.objects)
    values = np.array([0.0] + [(k + 1) / count for k in range(count)], np.float32)
    return quantize(box_downsample(values[labels_ss], scale))


def default_stick_width(height: int, width: int) -> int:
    """The pose condition's default: 4 pixels per 512."""
    return max(1, round(4 * min(height, width) / 512))


def pose_map(scene: Scene, stick_width: int | None = None) -> np.ndarray:
    """float32 [H, W, 3]: every stick figure drawn as an OpenPose skeleton on black (as the pose condition draws)."""
    from ccm_condition_pose import draw_openpose

    stick = stick_width or default_stick_width(scene.height, scene.width)
    canvas = np.zeros((scene.height, scene.width, 3), np.uint8)
    for obj in scene.objects:
        if isinstance(obj, Person):
            drawn = draw_openpose(list(obj.keypoints), scene.height, scene.width, stick)
            canvas = np.where(drawn.any(axis=-1, keepdims=True), drawn, canvas)
    return canvas.astype(np.float32) / 255.0


def keypoint_visibility(scene: Scene, labels: np.ndarray) -> list[list[bool]]:
    """Per stick figure, per keypoint: whether the figure itself is the front-most thing at that pixel."""
    out = []
    for index, obj in enumerate(scene.objects):
        if isinstance(obj, Person):
            flags = []
            for x, y in obj.keypoints:
                row, col = min(int(y), scene.height - 1), min(int(x), scene.width - 1)
                flags.append(bool(labels[row, col] == index + 1))
            out.append(flags)
    return out


def render_labels(scene: Scene, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """(supersampled labels, per-pixel majority labels at the image size)."""
    labels_ss = label_map(scene, supersample)
    return labels_ss, majority_labels(labels_ss, supersample, len(scene.objects) + 1)
