"""Random scenes and their captions, drawn from a numpy Generator (so a (seed, index) pair fixes a scene)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import Background, Person, Scene, SceneObject, Shape, figure_keypoints, label_map, object_mask, person_bounds
from .vocabulary import ARM_POSES, COLORS, SHAPES, SIZES, article

SHAPE_RADIUS = {"small": 0.085, "medium": 0.13, "large": 0.19}  # of the shorter image side
PERSON_HEIGHT = {"small": 0.45, "medium": 0.6, "large": 0.8}  # of the image height
ARM_ANGLES = {"down": (10.0, 35.0), "out": (75.0, 105.0), "up": (135.0, 165.0)}  # degrees from hanging


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn."""

    max_objects: int = 3  # 1..3: captions of more objects would not fit the tokenizer's 24 tokens
    person_probability: float = 0.35  # chance that one of the objects is a stick figure
    gradient_probability: float = 0.4  # chance of a gradient background
    overlap_probability: float = 0.35  # chance that an object is placed onto an earlier one
    min_visible: float = 0.5  # every object keeps at least this fraction of its area visible
    max_rotation: float = 15.0  # degrees, for polygons

    def __post_init__(self):
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"expected max_objects in 1..3, got {self.max_objects}")
        for name in ("person_probability", "gradient_probability", "overlap_probability", "min_visible"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"expected {name} in [0, 1], got {getattr(self, name)}")


def _center(obj: SceneObject) -> np.ndarray:
    if isinstance(obj, Shape):
        return np.asarray(obj.center)
    low, high = person_bounds(np.asarray(obj.keypoints), np.asarray(obj.head_center), obj.head_radius, obj.thickness)
    return (low + high) / 2


def _place(rng: np.random.Generator, low: np.ndarray, high: np.ndarray, near: np.ndarray | None, reach: float) -> np.ndarray:
    """A point in the box [low, high], near ``near`` (within ``reach``) when given."""
    if near is None:
        return rng.uniform(low, high)
    angle = rng.uniform(0, 2 * np.pi)
    target = near + reach * rng.uniform(0.3, 0.8) * np.array([np.cos(angle), np.sin(angle)])
    return np.clip(target, low, high)


def _shape(rng, color, height, width, near, config: SceneConfig) -> Shape:
    kind, size = str(rng.choice(SHAPES)), str(rng.choice(SIZES))
    radius = SHAPE_RADIUS[size] * min(height, width) * rng.uniform(0.9, 1.1)
    rotation = 0.0 if kind == "circle" else float(rng.uniform(-config.max_rotation, config.max_rotation))
    probe = Shape(kind, color, size, (0.0, 0.0), radius, rotation)
    margin = min(probe.extent + 1.0, min(height, width) / 2)
    low, high = np.array([margin, margin]), np.array([width - margin, height - margin])
    center = _place(rng, low, high, None if near is None else near[0], probe.extent + near[1] if near else 0.0)
    return Shape(kind, color, size, (float(center[0]), float(center[1])), float(radius), rotation)


def _person(rng, color, height, width, near) -> Person:
    size, arms = str(rng.choice(SIZES)), str(rng.choice(ARM_POSES))
    tall = PERSON_HEIGHT[size] * height * rng.uniform(0.92, 1.08)
    arm_angles = rng.uniform(*ARM_ANGLES[arms], size=2)
    elbows = rng.uniform(-25, 25, size=2)
    legs, knees = rng.uniform(5, 30, size=2), rng.uniform(-12, 12, size=2)
    for _ in range(8):  # shrink until the figure fits the image with a pixel to spare
        thickness = max(1.0, 0.045 * tall)
        points, head, head_radius = figure_keypoints(tall, arm_angles, elbows, legs, knees)
        low, high = person_bounds(points, head, head_radius, thickness)
        span = high - low
        fit = min((width - 2) / span[0], (height - 2) / span[1])
        if fit >= 1:
            break
        tall *= fit * 0.98
    box_low, box_high = 1 - low, np.array([width - 1, height - 1]) - high
    # the offset that puts the figure's centre near ``near`` is near[0] minus the centre it has now
    target = None if near is None else near[0] - (low + high) / 2
    offset = _place(rng, box_low, np.maximum(box_high, box_low), target, near[1] if near else 0.0)
    return Person(
        color, size, arms,
        keypoints=tuple((float(x), float(y)) for x, y in points + offset),
        head_center=(float(head[0] + offset[0]), float(head[1] + offset[1])),
        head_radius=float(head_radius),
        thickness=float(thickness),
    )  # fmt: skip


def _phrase(obj: SceneObject) -> str:
    words = f"{obj.size} {obj.color} {obj.kind}"
    if isinstance(obj, Person):
        words += f" with arms {obj.arms}"
    return f"{article(obj.size)} {words}"


def _relation(a: SceneObject, b: SceneObject, a_index: int, b_index: int, scene: Scene) -> str:
    """How ``a`` relates to ``b``: by depth when they overlap, else by the larger displacement."""
    if (object_mask(scene, a_index) & object_mask(scene, b_index)).any():
        return "in front of" if a_index > b_index else "behind"
    dx, dy = _center(a) - _center(b)
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """The caption: objects (with a relation when there are two) and the background."""
    objects = scene.objects
    if len(objects) == 2:
        first, second = (0, 1) if rng.random() < 0.5 else (1, 0)
        relation = _relation(objects[first], objects[second], first, second, scene)
        subject = f"{_phrase(objects[first])} {relation} {_phrase(objects[second])}"
    elif len(objects) == 3:
        subject = f"{_phrase(objects[0])} , {_phrase(objects[1])} and {_phrase(objects[2])}"
    else:
        subject = _phrase(objects[0])
    bg = scene.background
    return f"{subject} on {article(bg.color)} {bg.color}{' gradient' if bg.gradient else ''} background"


def word_regions(scene: Scene) -> list[int]:
    """For each word of ``scene.caption``: the region it describes (0 the background, k + 1 object k,
    as :func:`render.render_labels` numbers them), or -1 for words that describe none (articles,
    relations, "on", "and"). An object's size, colour and kind words (and a figure's "with arms <pose>")
    are its region; the background's colour, "gradient" and "background" are region 0. Colours are
    distinct within a scene, so each colour word names one region."""
    region_of = {scene.background.color: 0, **{obj.color: k + 1 for k, obj in enumerate(scene.objects)}}
    words = scene.caption.split()
    out = [-1] * len(words)
    for i, word in enumerate(words):
        if word not in region_of:
            continue
        region = region_of[word]
        out[i] = region
        if i > 0 and words[i - 1] in SIZES:
            out[i - 1] = region
        j = i + 1
        while j < len(words) and words[j] in (*SHAPES, "person", "gradient", "background"):
            out[j] = region
            j += 1
        if words[j - 1] == "person" and words[j : j + 2] == ["with", "arms"]:
            out[j : j + 3] = [region] * 3
    return out


def sample_scene(rng: np.random.Generator, height: int = 64, width: int = 64, config: SceneConfig = SceneConfig()) -> Scene:
    """Draw a scene; redraws (up to 100 times) until every object is at least ``min_visible`` visible."""
    for _ in range(100):
        count = int(rng.integers(1, config.max_objects + 1))
        colors = [str(c) for c in rng.choice(COLORS, size=count + 1, replace=False)]  # all distinct
        gradient = bool(rng.random() < config.gradient_probability)
        background = Background(colors[0], gradient, float(rng.uniform(0, 360)) if gradient else 90.0)
        person_at = int(rng.integers(count)) if rng.random() < config.person_probability else -1
        objects: list[SceneObject] = []
        for k in range(count):
            near = None
            if objects and rng.random() < config.overlap_probability:
                other = objects[int(rng.integers(len(objects)))]
                if isinstance(other, Shape):
                    other_extent = other.extent
                else:
                    other_extent = float(np.max(np.ptp(np.asarray(other.keypoints), axis=0))) / 2
                near = (_center(other), other_extent)
            if k == person_at:
                objects.append(_person(rng, colors[k + 1], height, width, near))
            else:
                objects.append(_shape(rng, colors[k + 1], height, width, near, config))
        scene = Scene(height, width, background, tuple(objects), caption="")
        if _visible_enough(scene, config.min_visible):
            break
    scene = Scene(height, width, background, tuple(objects), caption="")
    return Scene(height, width, background, tuple(objects), caption=describe(scene, rng))


def _visible_enough(scene: Scene, fraction: float) -> bool:
    labels = label_map(scene, 2)
    for index in range(len(scene.objects)):
        full = object_mask(scene, index, 2).sum()
        if full == 0 or (labels == index + 1).sum() < fraction * full:
            return False
    return True
