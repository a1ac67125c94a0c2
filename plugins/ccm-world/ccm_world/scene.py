"""Scene description and geometry: shapes, stick figures, backgrounds, and their label rasters.

Coordinates are continuous pixels of the output image: pixel (row i, column j) covers
[j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5) as (x, y). Objects are listed back to
front; object k gets label k + 1 in label maps, the background label 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

_SHIFT = 4  # OpenCV sub-pixel bits: coordinates are drawn to 1/16 of a (supersampled) pixel

# OpenPose body keypoints, in order (the person's right is the image's left: figures face us).
KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
# The sticks a figure is drawn with (keypoint index pairs); the head is a disc of its own.
FIGURE_STICKS: tuple[tuple[int, int], ...] = (
    (1, 8), (1, 11), (2, 5), (8, 11), (2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (11, 12), (12, 13),
)  # fmt: skip


@dataclass(frozen=True)
class Background:
    color: str
    gradient: bool = False
    angle: float = 90.0  # direction (degrees, image axes) in which the colour fades to gradient_end


@dataclass(frozen=True)
class Shape:
    kind: str  # one of vocabulary.SHAPES
    color: str
    size: str
    center: tuple[float, float]  # (x, y)
    radius: float  # the size of the shape; its farthest point is at ``extent``
    rotation: float = 0.0  # degrees, clockwise on screen

    @property
    def extent(self) -> float:
        return self.radius * _EXTENT[self.kind]

    def polygon(self) -> np.ndarray | None:
        """Vertices [N, 2] as (x, y), or None for a circle."""
        if self.kind == "circle":
            return None
        unit = _UNIT_POLYGONS[self.kind]
        angle = math.radians(self.rotation)
        rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
        return unit @ rotation * self.radius + np.asarray(self.center)


@dataclass(frozen=True)
class Person:
    """A stick figure: a head disc and sticks between OpenPose keypoints."""

    color: str
    size: str
    arms: str  # one of vocabulary.ARM_POSES
    keypoints: tuple[tuple[float, float], ...]  # 18 (x, y), OpenPose order
    head_center: tuple[float, float]
    head_radius: float
    thickness: float  # stick width in pixels

    kind = "person"


SceneObject = Shape | Person


@dataclass(frozen=True)
class Scene:
    height: int
    width: int
    background: Background
    objects: tuple[SceneObject, ...]  # back to front
    caption: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible description (what ``save_folder`` writes to scenes.jsonl)."""
        objects = []
        for obj in self.objects:
            entry = {"kind": obj.kind, **{k: v for k, v in asdict(obj).items() if k != "kind"}}
            if isinstance(obj, Person):
                entry["keypoints"] = [list(p) for p in obj.keypoints]
            objects.append(entry)
        return {
            "height": self.height,
            "width": self.width,
            "background": asdict(self.background),
            "objects": objects,
            "caption": self.caption,
        }


def _regular(count: int, radius: float, start: float = -90.0) -> np.ndarray:
    angles = np.radians(start + 360.0 * np.arange(count) / count)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.25), _regular(5, 0.5, start=-90.0 + 36.0)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


# Unit shapes (y down), sized so that the kinds look about as large as a circle of radius 1.
_UNIT_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([[-0.88, -0.88], [0.88, -0.88], [0.88, 0.88], [-0.88, 0.88]]),
    "triangle": _regular(3, 1.25),
    "star": _star(),
    "diamond": np.array([[0.0, -1.2], [0.82, 0.0], [0.0, 1.2], [-0.82, 0.0]]),
}
_EXTENT = {"circle": 1.0, **{k: float(np.linalg.norm(v, axis=1).max()) for k, v in _UNIT_POLYGONS.items()}}


# --- stick figures ----------------------------------------------------------------------

# Body proportions as fractions of the figure's height (head top to ankles when standing).
_HEAD, _TORSO, _SHOULDER, _HIP = 0.1, 0.32, 0.1, 0.06
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.17, 0.15, 0.22, 0.2


def _limb(origin: np.ndarray, side: int, angle: float, length: float) -> np.ndarray:
    """The end of a limb leaving ``origin`` at ``angle`` degrees from straight down, outwards on ``side``."""
    a = math.radians(angle)
    return origin + length * np.array([side * math.sin(a), math.cos(a)])


def figure_keypoints(height: float, arm_angles, elbow_bends, leg_angles, knee_bends) -> tuple[np.ndarray, np.ndarray, float]:
    """OpenPose keypoints [18, 2] of a figure with its neck at the origin, its head centre, and head radius.

    Angles are degrees from straight down, outwards, for (right, left): 0 hangs, 90 is
    horizontal, 180 points up; bends are added for the forearm / shin.
    """
    points = np.zeros((18, 2))
    head_radius = _HEAD * height
    head = np.array([0.0, -head_radius * 1.15])
    neck = np.zeros(2)
    pelvis = np.array([0.0, _TORSO * height])
    points[1] = neck
    for side, (shoulder, elbow, wrist, hip, knee, ankle), k in ((-1, (2, 3, 4, 8, 9, 10), 0), (1, (5, 6, 7, 11, 12, 13), 1)):
        points[shoulder] = neck + [side * _SHOULDER * height, 0.0]
        points[elbow] = _limb(points[shoulder], side, arm_angles[k], _UPPER_ARM * height)
        points[wrist] = _limb(points[elbow], side, arm_angles[k] + elbow_bends[k], _FOREARM * height)
        points[hip] = pelvis + [side * _HIP * height, 0.0]
        points[knee] = _limb(points[hip], side, leg_angles[k], _THIGH * height)
        points[ankle] = _limb(points[knee], side, leg_angles[k] + knee_bends[k], _SHIN * height)
    points[0] = head + [0.0, 0.25 * head_radius]
    points[14], points[15] = head + [-0.35 * head_radius, -0.15 * head_radius], head + [0.35 * head_radius, -0.15 * head_radius]
    points[16], points[17] = head + [-0.95 * head_radius, 0.0], head + [0.95 * head_radius, 0.0]
    return points, head, head_radius


def person_bounds(keypoints: np.ndarray, head: np.ndarray, head_radius: float, thickness: float) -> tuple[np.ndarray, np.ndarray]:
    """(min xy, max xy) of everything drawn for a figure."""
    low = np.minimum(keypoints.min(axis=0) - thickness / 2, head - head_radius)
    high = np.maximum(keypoints.max(axis=0) + thickness / 2, head + head_radius)
    return low, high


# --- label rasters ----------------------------------------------------------------------


def _fixed(points: np.ndarray, scale: int) -> np.ndarray:
    """Continuous (x, y) -> OpenCV fixed-point pixel coordinates at ``scale`` (centres on integers)."""
    return np.round((np.asarray(points, dtype=np.float64) * scale - 0.5) * (1 << _SHIFT)).astype(np.int32)


def draw_object(canvas: np.ndarray, obj: SceneObject, value: int, scale: int) -> None:
    """Draw ``obj`` filled with ``value`` into the uint8 raster ``canvas`` (its size is scale x the image's)."""
    if isinstance(obj, Shape):
        if obj.kind == "circle":
            center = tuple(int(v) for v in _fixed(obj.center, scale))
            radius = int(round(obj.radius * scale * (1 << _SHIFT)))
            cv2.circle(canvas, center, radius, value, thickness=-1, lineType=cv2.LINE_8, shift=_SHIFT)
        else:
            cv2.fillPoly(canvas, [_fixed(obj.polygon(), scale)], value, lineType=cv2.LINE_8, shift=_SHIFT)
        return
    thickness = max(1, int(round(obj.thickness * scale)))
    points = _fixed(obj.keypoints, scale)
    for a, b in FIGURE_STICKS:
        cv2.line(canvas, tuple(map(int, points[a])), tuple(map(int, points[b])), value, thickness, cv2.LINE_8, _SHIFT)
    # the neck joins the head to the shoulders
    head = _fixed(obj.head_center, scale)
    cv2.line(canvas, tuple(map(int, head)), tuple(map(int, points[1])), value, thickness, cv2.LINE_8, _SHIFT)
    radius = int(round(obj.head_radius * scale * (1 << _SHIFT)))
    cv2.circle(canvas, tuple(map(int, head)), radius, value, thickness=-1, lineType=cv2.LINE_8, shift=_SHIFT)


def label_map(scene: Scene, scale: int = 1) -> np.ndarray:
    """uint8 [H*scale, W*scale]: 0 background, k + 1 where object k is the front-most one drawn."""
    canvas = np.zeros((scene.height * scale, scene.width * scale), np.uint8)
    for index, obj in enumerate(scene.objects):
        draw_object(canvas, obj, index + 1, scale)
    return canvas


def object_mask(scene: Scene, index: int, scale: int = 1) -> np.ndarray:
    """bool [H*scale, W*scale]: where object ``index`` would be if nothing covered it."""
    canvas = np.zeros((scene.height * scale, scene.width * scale), np.uint8)
    draw_object(canvas, scene.objects[index], 1, scale)
    return canvas.astype(bool)
