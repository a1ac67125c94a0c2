"""Monocular depth for ccm-sdk, from transformers' depth estimators (DPT / MiDaS, Depth Anything).

Any checkpoint ``AutoModelForDepthEstimation`` loads works: a folder written by
``save_pretrained`` or a hub repo id. Its ``preprocessor_config.json`` (size, keep_aspect_ratio,
ensure_multiple_of, mean/std) is applied in torch, batched, on the model's device; without one,
the model type's usual settings are used. The prediction is resized to the input size and
normalised to [0, 1] per image with near = bright.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

import ccm_sdk
from ccm_sdk.conditions.weights import load_transformers_model, resolve_weights_file
from ccm_sdk.errors import InputError, MissingModelError
from ccm_sdk.interfaces import Condition, ConditionOptions

DEFAULT_MODEL = "LiheYoung/depth-anything-small-hf"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The image processor settings these model types ship with, for folders that lack preprocessor_config.json.
DEFAULT_PREPROCESSING = {
    "depth_anything": {
        "size": {"height": 518, "width": 518},
        "keep_aspect_ratio": True,
        "ensure_multiple_of": 14,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    },
    "dpt": {
        "size": {"height": 384, "width": 384},
        "keep_aspect_ratio": False,
        "ensure_multiple_of": 1,
        "image_mean": (0.5, 0.5, 0.5),
        "image_std": (0.5, 0.5, 0.5),
    },
}
# Model types whose output grows with distance (metric depth); DPT/MiDaS and Depth Anything
# predict relative inverse depth, which is already "near = large".
METRIC_DEPTH_TYPES = frozenset({"glpn", "zoedepth", "depth_pro"})


def model_input_size(
    height: int, width: int, target: tuple[int, int], keep_aspect_ratio: bool, multiple: int
) -> tuple[int, int]:
    """The size DPT's image processor resizes an image to (its ``get_resize_output_image_size``)."""
    scale_h, scale_w = target[0] / height, target[1] / width
    if keep_aspect_ratio:
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h

    def constrain(value: float) -> int:
        return max(multiple, round(value / multiple) * multiple)

    return constrain(scale_h * height), constrain(scale_w * width)


class DepthOptions(ConditionOptions):
    model: str = Field(default=DEFAULT_MODEL, description="save_pretrained folder or hub repo id of a depth estimator")
    local_files_only: bool = Field(default=False, description="never download; read the hub cache only")
    invert: bool | None = Field(
        default=None, description="flip near/far; default: only for metric-depth model types (GLPN, ZoeDepth, DepthPro)"
    )


class DepthCondition(Condition):
    """Relative depth, near = bright, grey replicated to 3 channels; h(y) is the same estimator."""

    name = "depth"
    channels = 3
    Options = DepthOptions
    description = "monocular depth (transformers DPT / Depth Anything), normalised per image, near = bright"
    weights = DEFAULT_MODEL

    def __init__(self, **options):
        super().__init__(**options)
        from transformers import AutoModelForDepthEstimation

        o = self.options
        self.model = load_transformers_model(
            AutoModelForDepthEstimation, o.model, local_files_only=o.local_files_only, what="depth model"
        )
        self.preprocessing = self._preprocessing(o.model, self.model.config.model_type, o.local_files_only)
        self.invert = o.invert if o.invert is not None else self.model.config.model_type in METRIC_DEPTH_TYPES

    @staticmethod
    def _preprocessing(source: str, model_type: str, local_files_only: bool) -> dict:
        settings = dict(DEFAULT_PREPROCESSING.get(model_type, DEFAULT_PREPROCESSING["dpt"]))
        try:
            path = resolve_weights_file(source, ("preprocessor_config.json",), local_files_only=local_files_only)
        except MissingModelError:
            return settings
        config = json.loads(Path(path).read_text())
        settings.update(
            {
                k: config[k]
                for k in ("size", "keep_aspect_ratio", "ensure_multiple_of", "image_mean", "image_std")
                if k in config
            }
        )
        settings["do_normalize"] = config.get("do_normalize", True)
        return settings

    def to(self, device: torch.device | str) -> DepthCondition:
        self.model.to(device)
        return self

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> ``pixel_values`` as the checkpoint's image processor makes them."""
        p = self.preprocessing
        size = p["size"]
        target = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        new_size = model_input_size(
            *images.shape[-2:], target, bool(p["keep_aspect_ratio"]), int(p["ensure_multiple_of"])
        )
        shrinking = new_size[0] < images.shape[-2] or new_size[1] < images.shape[-1]
        x = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=shrinking).clamp(0, 1)
        if p.get("do_normalize", True):
            mean = torch.tensor(p["image_mean"], device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(p["image_std"], device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def preprocess(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        device = next(self.model.parameters()).device
        depth = self.model(pixel_values=self.model_inputs(images.to(device))).predicted_depth
        return depth_to_control(depth, tuple(images.shape[-2:]), invert=self.invert)


def depth_to_control(depth: torch.Tensor, size: tuple[int, int], *, invert: bool = False) -> torch.Tensor:
    """Predicted depth [B, h, w] -> [B, 3, *size]: resized, min-max normalised per image, near = bright.

    ``depth`` grows with nearness (inverse depth, as DPT predicts) unless ``invert``.
    """
    depth = F.interpolate(depth[:, None].float(), size=size, mode="bicubic", align_corners=False)
    low = depth.amin(dim=(2, 3), keepdim=True)
    span = depth.amax(dim=(2, 3), keepdim=True) - low
    # a constant prediction has no near or far: map it to black rather than dividing by zero
    normalised = torch.where(span > 0, (depth - low) / span.clamp_min(1e-12), torch.zeros_like(depth))
    if invert:
        normalised = torch.where(span > 0, 1.0 - normalised, normalised)
    return normalised.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def build_tiny_depth_model(folder: str | os.PathLike, *, kind: str = "depth_anything", seed: int = 0) -> Path:
    """Save a tiny, randomly initialised DPT or Depth Anything (the real architectures) for tests."""
    import transformers
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTConfig,
        DPTForDepthEstimation,
    )

    torch.manual_seed(seed)
    if kind == "depth_anything":
        backbone = Dinov2Config(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=56,
            patch_size=14,
            out_features=["stage1", "stage2"],
            reshape_hidden_states=False,
        )
        config = DepthAnythingConfig(
            backbone_config=backbone,
            neck_hidden_sizes=[8, 8],
            fusion_hidden_size=8,
            reassemble_hidden_size=16,
            reassemble_factors=[4, 2],
            head_hidden_size=8,
        )
        model = DepthAnythingForDepthEstimation(config)
        processor = {
            "size": {"height": 56, "width": 56},
            "keep_aspect_ratio": True,
            "ensure_multiple_of": 14,
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
        }
    elif kind == "dpt":
        config = DPTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=32,
            patch_size=8,
            backbone_out_indices=[0, 1],
            neck_hidden_sizes=[8, 8],
            fusion_hidden_size=8,
            reassemble_factors=[4, 2],
            head_hidden_size=8,
        )
        model = DPTForDepthEstimation(config)
        processor = {
            "size": {"height": 32, "width": 32},
            "keep_aspect_ratio": False,
            "ensure_multiple_of": 1,
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
        }
    else:
        raise InputError(f"expected kind 'depth_anything' or 'dpt', got {kind!r}")
    folder = Path(folder)
    model.eval().save_pretrained(folder)
    processor_cls = getattr(transformers, "DPTImageProcessorPil", None) or transformers.DPTImageProcessor
    processor_cls(**processor).save_pretrained(folder)
    return folder


@ccm_sdk.hookimpl
def register_conditions(register):
    register(DepthCondition)
