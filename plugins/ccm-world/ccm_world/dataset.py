"""WorldDataset: seeded, unlimited scenes with captions and exact control maps, as a torch Dataset."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ccm_sdk.conditions.mask import MaskCondition, random_masks
from ccm_sdk.conditions.sr import SRCondition
from ccm_sdk.errors import InputError, UnknownNameError
from ccm_sdk.eval.colour import ColourTargets
from ccm_sdk.eval.limbs import LimbTargets
from ccm_sdk.eval.shape import ShapeTargets

from . import render
from .generate import SceneConfig, sample_scene, word_regions
from .scene import FIGURE_STICKS, Person, Scene, Shape, object_mask
from .vocabulary import COLORS, PALETTE, SHAPES, SIZES

# Control-map keys, named after the SDK condition whose ControlNet each one feeds.
WORLD_CONDITIONS: tuple[str, ...] = ("canny", "sketch", "hed", "depth", "pose", "mask", "sr")
CONTROL_CHANNELS = {"canny": 3, "sketch": 3, "hed": 3, "depth": 3, "pose": 3, "mask": 4, "sr": 3}
# The multi-hot scene attributes in ``item["labels"]`` (the feature network's training targets).
ATTRIBUTE_NAMES: tuple[str, ...] = (
    *(f"shape:{s}" for s in (*SHAPES, "person")),
    *(f"color:{c}" for c in COLORS),
    *(f"background:{c}" for c in COLORS),
    *(f"size:{s}" for s in SIZES),
    "background:gradient",
)


# The sticks of FIGURE_STICKS that are arms and legs (not the torso): what the limb column scores.
LIMB_STICKS: tuple[tuple[int, int], ...] = ((2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (11, 12), (12, 13))


@dataclass
class WorldSample:
    """Everything rendered for one scene (numpy, [H, W] or [H, W, C] float32 in [0, 1])."""

    index: int
    scene: Scene
    image: np.ndarray
    labels: np.ndarray  # uint8 [H, W]: 0 background, k + 1 object k (majority of the pixel)
    controls: dict[str, np.ndarray] = field(default_factory=dict)
    keypoint_visible: list[list[bool]] = field(default_factory=list)


def scene_attributes(scene: Scene) -> torch.Tensor:
    """float [len(ATTRIBUTE_NAMES)] multi-hot of what the scene shows."""
    present = {f"background:{scene.background.color}"}
    if scene.background.gradient:
        present.add("background:gradient")
    for obj in scene.objects:
        present |= {f"shape:{obj.kind}", f"color:{obj.color}", f"size:{obj.size}"}
    return torch.tensor([name in present for name in ATTRIBUTE_NAMES], dtype=torch.float32)


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 16 or width < 16:
        raise InputError(f"expected a world image size of at least 16x16, got {height}x{width}")
    return int(height), int(width)


class WorldDataset(Dataset):
    """Scene ``index`` of ``seed`` as ``{"image", "caption", "controls", "labels", "index", "scene"}``.

    ``image`` is [3, H, W] in [0, 1]; ``controls`` maps each name in ``conditions`` to its exact
    ground-truth map ([3, H, W], or [4, H, W] for ``mask``) on the 1/255 grid; ``labels`` is the
    multi-hot of ``ATTRIBUTE_NAMES``; ``scene`` the JSON-compatible scene description. With
    ``grounding`` items also carry ``regions`` ([H, W] int64: 0 background, k + 1 object k) and
    ``word_regions`` (the region each caption word describes, -1 none), for t2i's grounding loss. Any index
    in ``range(length)`` renders on demand, identically on every call and in every process.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 64,
        length: int = 100_000,
        seed: int = 0,
        conditions: Sequence[str] = WORLD_CONDITIONS,
        *,
        sr_factor: int = 4,
        sketch_width: float = 1.0,
        soft_edge_sigma: float | None = None,
        pose_stick_width: int | None = None,
        supersample: int = 4,
        scene_config: SceneConfig | None = None,
        grounding: bool = False,
    ):
        self.height, self.width = _as_size(size)
        if length < 1:
            raise InputError(f"expected length >= 1, got {length}")
        unknown = [c for c in conditions if c not in WORLD_CONDITIONS]
        if unknown:
            raise UnknownNameError("world condition", unknown[0], WORLD_CONDITIONS)
        if not 1 <= sr_factor <= min(self.height, self.width):
            raise InputError(f"expected sr_factor in 1..{min(self.height, self.width)}, got {sr_factor}")
        if supersample < 1:
            raise InputError(f"expected supersample >= 1, got {supersample}")
        self.length, self.seed, self.conditions = int(length), int(seed), tuple(conditions)
        self.sr_factor, self.sketch_width, self.supersample = int(sr_factor), float(sketch_width), int(supersample)
        self.soft_edge_sigma = soft_edge_sigma or render.default_soft_edge_sigma(self.height, self.width)
        self.pose_stick_width = pose_stick_width or render.default_stick_width(self.height, self.width)
        self.scene_config = scene_config or SceneConfig()
        self.grounding = bool(grounding)
        self._sr = SRCondition(factor=self.sr_factor)
        self._mask = MaskCondition()

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        # one independent stream per (seed, index, purpose): adding a condition never changes a scene
        return np.random.default_rng([self.seed, index, stream])

    def scene(self, index: int) -> Scene:
        """The scene description of sample ``index``."""
        self._check_index(index)
        return sample_scene(self._rng(index, 0), self.height, self.width, self.scene_config)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside this world dataset of length {self.length}")

    def render(self, index: int, conditions: Sequence[str] | None = None) -> WorldSample:
        """Render sample ``index`` with the control maps ``conditions`` (default: the dataset's)."""
        scene = self.scene(index)
        s = self.supersample
        labels_ss, labels = render.render_labels(scene, s)
        image = render.render_image(scene, labels_ss, s)
        sample = WorldSample(index, scene, image, labels, keypoint_visible=render.keypoint_visibility(scene, labels))
        wanted = self.conditions if conditions is None else tuple(conditions)
        edges = render.edge_map(labels) if {"canny", "hed"} & set(wanted) else None
        for name in wanted:
            if name == "canny":
                sample.controls[name] = edges
            elif name == "sketch":
                sample.controls[name] = render.sketch_map(labels_ss, s, self.sketch_width)
            elif name == "hed":
                sample.controls[name] = render.soft_edge_map(edges, self.soft_edge_sigma)
            elif name == "depth":
                sample.controls[name] = render.depth_map(scene, labels_ss, s)
            elif name == "pose":
                sample.controls[name] = render.pose_map(scene, self.pose_stick_width)
            elif name == "mask":
                sample.controls[name] = self._mask_map(image, index)
            elif name == "sr":
                sample.controls[name] = self._sr_map(image)
            else:
                raise UnknownNameError("world condition", name, WORLD_CONDITIONS)
        return sample

    def _mask_map(self, image: np.ndarray, index: int) -> np.ndarray:
        mask = random_masks(1, self.height, self.width, seed=self._rng(index, 1))
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
        return self._mask.preprocess(tensor, mask=mask)[0].permute(1, 2, 0).numpy()

    def _sr_map(self, image: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
        return render.quantize(self._sr.preprocess(tensor)[0].permute(1, 2, 0).numpy())

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        sample = self.render(index)
        controls = {name: _to_chw(sample.controls[name], CONTROL_CHANNELS[name]) for name in self.conditions}
        scene = sample.scene.to_dict()
        if sample.keypoint_visible:
            scene["keypoint_visible"] = sample.keypoint_visible
        item = {
            "image": _to_chw(sample.image, 3),
            "caption": sample.scene.caption,
            "controls": controls,
            "labels": scene_attributes(sample.scene),
            "index": index,
            "scene": scene,
        }
        if self.grounding:  # t2i's grounding loss: which pixels each caption word describes
            item["regions"] = torch.from_numpy(sample.labels.astype(np.int64))
            item["word_regions"] = torch.tensor(word_regions(sample.scene), dtype=torch.long)
        return item

    def colour_targets(self, index: int) -> ColourTargets:
        """Which pixels are the background and each object, and the palette colour the caption asks of each
        (``ccm eval``'s colour column)."""
        self._check_index(int(index))
        scene = self.scene(int(index))
        _, labels = render.render_labels(scene, self.supersample)
        asked = [COLORS.index(scene.background.color), *(COLORS.index(obj.color) for obj in scene.objects)]
        palette = torch.tensor([PALETTE[name] for name in COLORS], dtype=torch.float32) / 255.0
        return ColourTargets(torch.from_numpy(labels.astype(np.int64)), torch.tensor(asked), palette)

    def shape_targets(self, index: int) -> ShapeTargets:
        """For each shape in the scene (figures have none), every vocabulary shape drawn at its place, size and
        rotation (the candidates, in ``SHAPES`` order), the one the caption names, its visible pixels and the
        pixels that may be judged: the background and the shape itself (``ccm eval``'s shape column)."""
        self._check_index(int(index))
        scene = self.scene(int(index))
        _, labels = render.render_labels(scene, self.supersample)
        candidates, asked, visible, allowed = [], [], [], []
        for k, obj in enumerate(scene.objects):
            if not isinstance(obj, Shape):
                continue
            drawn = []
            for kind in SHAPES:
                alone = Scene(scene.height, scene.width, scene.background, (replace(obj, kind=kind),), "")
                coverage = render.box_downsample(object_mask(alone, 0, self.supersample).astype(np.float32), self.supersample)
                drawn.append(coverage > 0.5)
            candidates.append(np.stack(drawn))
            asked.append(SHAPES.index(obj.kind))
            visible.append(labels == k + 1)
            allowed.append((labels == 0) | (labels == k + 1))
        h, w = self.height, self.width
        return ShapeTargets(
            torch.from_numpy(np.stack(candidates)) if candidates else torch.zeros(0, len(SHAPES), h, w, dtype=torch.bool),
            torch.tensor(asked, dtype=torch.long),
            torch.from_numpy(np.stack(visible)) if visible else torch.zeros(0, h, w, dtype=torch.bool),
            torch.from_numpy(np.stack(allowed)) if allowed else torch.zeros(0, h, w, dtype=torch.bool),
        )

    def limb_targets(self, index: int) -> LimbTargets:
        """The arms and legs (upper arm, forearm, thigh, shin per side) of every stick figure whose two ends are
        visible (the figure itself is front-most there), read back by the world's pose net (``ccm eval``'s limb column)."""
        self._check_index(int(index))
        scene = self.scene(int(index))
        _, labels = render.render_labels(scene, self.supersample)
        visible = iter(render.keypoint_visibility(scene, labels))
        segments = []
        for obj in scene.objects:
            if isinstance(obj, Person):
                shown = next(visible)
                segments += [(obj.keypoints[a], obj.keypoints[b]) for a, b in LIMB_STICKS if shown[a] and shown[b]]
        return LimbTargets(torch.tensor(segments, dtype=torch.float32).reshape(-1, 2, 2), "world-pose")

    def save_folder(self, path: str | os.PathLike, n: int, *, start: int = 0) -> Path:
        """Write samples ``start .. start+n-1`` in the folder-dataset layout.

        ``NNNNN.png`` + ``NNNNN.txt`` (caption), ``control/<name>/NNNNN.png`` per condition (RGB;
        RGBA for ``mask``, whose alpha is the mask), and ``scenes.jsonl`` with each scene's
        description. The SDK's ``ImageFolderDataset`` reads it with ``control_keys=("control/<name>",)``.
        """
        if n < 1:
            raise InputError(f"expected n >= 1 samples to save, got {n}")
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for name in self.conditions:
            (root / "control" / name).mkdir(parents=True, exist_ok=True)
        with open(root / "scenes.jsonl", "w") as scenes:
            for index in range(start, start + n):
                item = self[index]
                stem = f"{index:05d}"
                _save_png(item["image"], root / f"{stem}.png")
                (root / f"{stem}.txt").write_text(item["caption"] + "\n")
                for name, control in item["controls"].items():
                    _save_png(control, root / "control" / name / f"{stem}.png")
                scenes.write(json.dumps({"file_name": f"{stem}.png", **item["scene"]}) + "\n")
        return root


def _to_chw(array: np.ndarray, channels: int) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if tensor.shape[0] == 1 and channels == 3:
        tensor = tensor.expand(3, -1, -1)
    return tensor.contiguous()


def _save_png(tensor: torch.Tensor, path: Path) -> None:
    array = (tensor.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    Image.fromarray(array).save(path)  # RGB, or RGBA for 4 channels

