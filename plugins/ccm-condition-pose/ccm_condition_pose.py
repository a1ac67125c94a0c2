"""Human pose for ccm-sdk: ViTPose keypoints (transformers) drawn as an OpenPose skeleton on black.

ViTPose is a top-down estimator: it needs a person box. Without a person detector the whole image
is the box, so this suits images with one main person (the usual case for pose-conditioned
generation); several people get one merged, usually poor, skeleton. Pre- and post-processing
follow transformers' ``VitPoseImageProcessor`` (box padded by 1.25 to the model's aspect ratio,
bilinear affine crop, DARK sub-pixel refinement of the heatmap peaks), in torch and batched.
The 17 COCO keypoints become OpenPose's 18 (neck = shoulder midpoint), drawn with OpenPose's
limb colours as ControlNet 1.1's openpose annotator draws them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

import ccm_sdk
from ccm_sdk.conditions.weights import load_transformers_model, resolve_weights_file
from ccm_sdk.errors import IncompatibleModelsError, MissingModelError
from ccm_sdk.interfaces import Condition, ConditionOptions

DEFAULT_MODEL = "usyd-community/vitpose-base-simple"
PADDING = 1.25  # box padding of ViTPose's top-down pipeline
# OpenPose keypoint i is COCO keypoint COCO_OF_OPENPOSE[i]; None is the neck (mean of the shoulders).
COCO_OF_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# OpenPose limbs (0-based keypoint pairs) and colours (RGB), in OpenPose's drawing order.
# fmt: off
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
# fmt: on


def whole_image_box(
    height: int, width: int, input_size: tuple[int, int]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(center, scale) in pixels of the box (0, 0, W, H), widened to the model's aspect ratio and padded."""
    aspect = input_size[1] / input_size[0]
    box_w, box_h = float(width), float(height)
    if box_w > aspect * box_h:
        box_h = box_w / aspect
    elif box_w < aspect * box_h:
        box_w = box_h * aspect
    return (width * 0.5, height * 0.5), (box_w * PADDING, box_h * PADDING)


def crop(images: torch.Tensor, center, scale, input_size: tuple[int, int]) -> torch.Tensor:
    """The affine crop of the box to ``input_size`` (ViTPose's unbiased warp), bilinear, black outside."""
    height, width = images.shape[-2:]
    out_h, out_w = input_size
    xs = (
        torch.arange(out_w, device=images.device, dtype=torch.float32) * (scale[0] / (out_w - 1))
        + center[0]
        - scale[0] / 2
    )
    ys = (
        torch.arange(out_h, device=images.device, dtype=torch.float32) * (scale[1] / (out_h - 1))
        + center[1]
        - scale[1] / 2
    )
    gx = 2 * xs / max(width - 1, 1) - 1
    gy = 2 * ys / max(height - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
    return F.grid_sample(
        images, grid.expand(images.shape[0], -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=True
    )


def decode_heatmaps(heatmaps: torch.Tensor, center, scale, kernel: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps [B, K, h, w] -> keypoints [B, K, 2] (x, y in image pixels) and scores [B, K]."""
    batch, joints, h, w = heatmaps.shape
    flat = heatmaps.reshape(batch, joints, -1)
    scores, index = flat.max(dim=-1)
    coords = torch.stack([(index % w).float(), (index // w).float()], dim=-1)
    coords = _dark_refine(coords, heatmaps.float(), kernel)
    x = coords[..., 0] * (scale[0] / (w - 1)) + center[0] - scale[0] / 2
    y = coords[..., 1] * (scale[1] / (h - 1)) + center[1] - scale[1] / 2
    return torch.stack([x, y], dim=-1), scores


def _symmetric_indices(n: int, radius: int, device) -> torch.Tensor:
    # scipy's "reflect" boundary (d c b a | a b c d | d c b a), for any radius
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _dark_refine(coords: torch.Tensor, heatmaps: torch.Tensor, kernel: int) -> torch.Tensor:
    # DARK (Zhang et al., CVPR 2020): a second-order Taylor step on the smoothed log-heatmap at the peak.
    batch, joints, h, w = heatmaps.shape
    radius = (kernel - 1) // 2
    taps = torch.arange(-radius, radius + 1, device=heatmaps.device, dtype=torch.float32)
    gauss = torch.exp(-(taps**2) / (2 * 0.8**2))
    gauss = gauss / gauss.sum()
    # scipy.ndimage.gaussian_filter(sigma=0.8, radius=radius), as two separable convolutions
    x = heatmaps.reshape(batch * joints, 1, h, w)
    x = F.conv2d(x.index_select(3, _symmetric_indices(w, radius, x.device)), gauss.view(1, 1, 1, -1))
    x = F.conv2d(x.index_select(2, _symmetric_indices(h, radius, x.device)), gauss.view(1, 1, -1, 1))
    logs = F.pad(x.clamp(0.001, 50).log(), (1, 1, 1, 1), mode="replicate").reshape(batch, joints, -1)
    px = coords[..., 0].long() + 1
    py = coords[..., 1].long() + 1

    def at(dy: int, dx: int) -> torch.Tensor:
        return logs.gather(-1, ((py + dy) * (w + 2) + (px + dx)).unsqueeze(-1)).squeeze(-1).double()

    c = at(0, 0)
    gradient = torch.stack([0.5 * (at(0, 1) - at(0, -1)), 0.5 * (at(1, 0) - at(-1, 0))], dim=-1).unsqueeze(-1)
    dxx = at(0, 1) - 2 * c + at(0, -1)
    dyy = at(1, 0) - 2 * c + at(-1, 0)
    dxy = 0.5 * (at(1, 1) - at(0, 1) - at(1, 0) + 2 * c - at(0, -1) - at(-1, 0) + at(-1, -1))
    eps = float(np.finfo(np.float32).eps)
    hessian = torch.stack([torch.stack([dxx + eps, dxy], -1), torch.stack([dxy, dyy + eps], -1)], -2)
    inverse, info = torch.linalg.inv_ex(hessian)
    step = (inverse @ gradient).squeeze(-1)
    step = torch.where((info == 0).unsqueeze(-1) & torch.isfinite(step), step, torch.zeros_like(step))
    return coords - step.float()


def to_openpose(
    keypoints: torch.Tensor, scores: torch.Tensor, threshold: float
) -> list[list[tuple[float, float] | None]]:
    """COCO-17 keypoints [B, 17, 2] and scores -> per image, OpenPose's 18 points (None = not seen)."""
    people = []
    for points, conf in zip(keypoints.tolist(), scores.tolist(), strict=True):
        visible = [tuple(p) if c > threshold else None for p, c in zip(points, conf, strict=True)]
        pose = []
        for coco in COCO_OF_OPENPOSE:
            if coco is not None:
                pose.append(visible[coco])
            elif visible[5] is not None and visible[6] is not None:
                pose.append(((visible[5][0] + visible[6][0]) / 2, (visible[5][1] + visible[6][1]) / 2))
            else:
                pose.append(None)
        people.append(pose)
    return people


def draw_openpose(pose: list[tuple[float, float] | None], height: int, width: int, stick_width: int = 4) -> np.ndarray:
    """OpenPose's body drawing: limbs as ellipses at 60% colour, then joints as discs; uint8 RGB [H, W, 3]."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for (a, b), color in zip(LIMBS, COLORS[: len(LIMBS)], strict=True):
        if pose[a] is None or pose[b] is None:
            continue
        (x1, y1), (x2, y2) = pose[a], pose[b]
        length = math.hypot(x1 - x2, y1 - y2)
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        polygon = cv2.ellipse2Poly(
            (int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), stick_width), int(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for point, color in zip(pose, COLORS, strict=True):
        if point is not None:
            cv2.circle(canvas, (int(point[0]), int(point[1])), stick_width, color, thickness=-1)
    return canvas


class PoseOptions(ConditionOptions):
    model: str = Field(
        default=DEFAULT_MODEL, description="save_pretrained folder or hub repo id of a VitPoseForPoseEstimation"
    )
    local_files_only: bool = Field(default=False, description="never download; read the hub cache only")
    threshold: float = Field(default=0.3, description="keypoints scoring at most this are not drawn")
    stick_width: int | None = Field(
        default=None, ge=1, le=64, description="limb half-width and joint radius in pixels (default: 4 per 512 px)"
    )
    dataset_index: int = Field(default=0, ge=0, description="expert head of ViTPose+ models (0: COCO)")


class PoseCondition(Condition):
    """OpenPose-style skeleton of the (single) person, on black, 3 channels; h(y) is the same pipeline."""

    name = "pose"
    channels = 3
    Options = PoseOptions
    description = "human pose (ViTPose, whole image as the person box) drawn as an OpenPose skeleton"
    weights = DEFAULT_MODEL

    def __init__(self, **options):
        super().__init__(**options)
        from transformers import VitPoseForPoseEstimation

        o = self.options
        self.model = load_transformers_model(
            VitPoseForPoseEstimation,
            o.model,
            local_files_only=o.local_files_only,
            what="pose model",
            model_types=("vitpose",),
        )
        if self.model.config.num_labels != 17:
            raise IncompatibleModelsError(
                f"pose model predicts {self.model.config.num_labels} keypoints; expected the 17 COCO body keypoints"
            )
        self.preprocessing = self._preprocessing(o.model, self.model.config, o.local_files_only)

    @staticmethod
    def _preprocessing(source: str, config, local_files_only: bool) -> dict:
        size = config.backbone_config.image_size
        settings = {
            "size": (int(size[0]), int(size[1])),
            "image_mean": (0.485, 0.456, 0.406),
            "image_std": (0.229, 0.224, 0.225),
        }
        try:
            path = resolve_weights_file(source, ("preprocessor_config.json",), local_files_only=local_files_only)
        except MissingModelError:
            return settings
        processor = json.loads(Path(path).read_text())
        if "size" in processor:
            settings["size"] = (int(processor["size"]["height"]), int(processor["size"]["width"]))
        settings.update({k: tuple(processor[k]) for k in ("image_mean", "image_std") if k in processor})
        return settings

    def to(self, device: torch.device | str) -> PoseCondition:
        self.model.to(device)
        return self

    def keypoints(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """COCO-17 keypoints [B, 17, 2] in image pixels and their scores [B, 17]."""
        p = self.preprocessing
        device = next(self.model.parameters()).device
        images = images.to(device)
        center, scale = whole_image_box(*images.shape[-2:], p["size"])
        x = crop(images, center, scale, p["size"])
        mean = torch.tensor(p["image_mean"], device=device).view(1, 3, 1, 1)
        std = torch.tensor(p["image_std"], device=device).view(1, 3, 1, 1)
        kwargs = {}
        if getattr(self.model.config.backbone_config, "num_experts", 1) > 1:
            kwargs["dataset_index"] = torch.full((x.shape[0],), self.options.dataset_index, device=device)
        heatmaps = self.model(pixel_values=(x - mean) / std, **kwargs).heatmaps
        return decode_heatmaps(heatmaps, center, scale)

    def preprocess(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        height, width = images.shape[-2:]
        stick = self.options.stick_width or max(1, round(4 * min(height, width) / 512))
        keypoints, scores = self.keypoints(images)
        canvases = [
            draw_openpose(pose, height, width, stick)
            for pose in to_openpose(keypoints.cpu(), scores.cpu(), self.options.threshold)
        ]
        # on the model's device, as the other model-backed conditions return their maps
        return torch.from_numpy(np.stack(canvases)).to(keypoints.device).permute(0, 3, 1, 2).float() / 255.0


def build_tiny_pose_model(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a tiny, randomly initialised ViTPose (the real architecture, 17 keypoints) for tests."""
    import transformers
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    torch.manual_seed(seed)
    backbone = VitPoseBackboneConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=[64, 48],
        patch_size=[16, 16],
        out_indices=[2],
    )
    model = VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17)).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    processor_cls = getattr(transformers, "VitPoseImageProcessorPil", None) or transformers.VitPoseImageProcessor
    processor_cls(size={"height": 64, "width": 48}).save_pretrained(folder)
    return folder


@ccm_sdk.hookimpl
def register_conditions(register):
    register(PoseCondition)
