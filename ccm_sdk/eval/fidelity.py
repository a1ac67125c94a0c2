"""Fidelity: how well a generated image obeys its control, || h(y) - c ||_1 (CCM, section 5).

h is the condition's extractor (``Condition.extract``, run through ``extract_from`` so inputs
are checked and the map comes back at the image's size), y the generated image, c the control
map the image was generated from. Normalisation, so values lie in [0, 1] and compare across
sizes: the L1 norm is divided by the number of elements, i.e. the mean absolute difference over
all channels and pixels of the map, with maps in [0, 1].

The ``mask`` condition compares only what the generator was told to keep: the mean absolute
difference over the RGB channels of the unmasked pixels (mask 0). Its map is masked RGB plus
the mask, so over all elements the masked region and the mask channel would add exact zeros
and the score would shrink with the mask's coverage; an image whose mask covers every pixel has
nothing to compare and scores NaN (left out of means).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import images as image_utils
from ..conditions.mask import MaskCondition
from ..errors import ChannelMismatchError, ImageSizeError, InputError, ShapeError
from ..interfaces import Condition
from ..registry import get_condition


def _resolve(condition: str | Condition) -> Condition:
    return get_condition(condition) if isinstance(condition, str) else condition


def fidelity_per_image(condition: str | Condition, generated, controls, **extract_kwargs: Any) -> torch.Tensor:
    """float64 [B]: the Fidelity of each generated image against its control map.

    ``generated``: images [B, 3, H, W] in [0, 1] (or anything ``to_tensor`` takes);
    ``controls``: the maps the images were generated from, [B, C, H, W] (or [1, C, H, W] for all).
    """
    condition = _resolve(condition)
    images = image_utils.to_tensor(generated, channels=3)
    control = image_utils.to_tensor(controls)
    if control.shape[1] != condition.channels:
        raise ChannelMismatchError(
            f"control maps have {control.shape[1]} channels but condition {condition.name!r} makes {condition.channels}"
        )
    if tuple(control.shape[-2:]) != tuple(images.shape[-2:]):
        raise ImageSizeError(f"control maps are {tuple(control.shape[-2:])} but the images are {tuple(images.shape[-2:])}")
    if control.shape[0] not in (1, images.shape[0]):
        raise ShapeError(f"expected 1 or {images.shape[0]} control maps for {images.shape[0]} images, got {control.shape[0]}")
    control = control.expand(images.shape[0], -1, -1, -1).to(images.device)
    if isinstance(condition, MaskCondition):
        extract_kwargs.setdefault("mask", control)
    extracted = condition.extract_from(images, **extract_kwargs).to(images.device)
    difference = (extracted.double() - control.double()).abs()
    if isinstance(condition, MaskCondition):
        keep = 1.0 - (control[:, 3:] > condition.options.mask_threshold).double()  # [B, 1, H, W]
        weights = keep.expand(-1, 3, -1, -1)
        total = weights.sum(dim=(1, 2, 3))
        error = (difference[:, :3] * weights).sum(dim=(1, 2, 3))
        return torch.where(total > 0, error / total.clamp_min(1.0), torch.full_like(total, float("nan"))).cpu()
    return difference.mean(dim=(1, 2, 3)).cpu()


def fidelity(condition: str | Condition, generated, controls, **extract_kwargs: Any) -> float:
    """The mean Fidelity over a batch (images with nothing to compare are left out)."""
    values = fidelity_per_image(condition, generated, controls, **extract_kwargs)
    kept = values[~torch.isnan(values)]
    if kept.numel() == 0:
        raise InputError("no image has an unmasked pixel to compare; Fidelity is undefined")
    return float(kept.mean())
