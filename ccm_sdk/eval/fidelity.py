"""Fidelity: how well a generated image obeys its control, || h(y) - c ||_1 (CCM, section 5).

h is the condition's extractor (``Condition.extract``, run through ``extract_from`` so inputs
are checked and the map comes back at the image's size), y the generated image, c the control
map the image was generated from. Normalisation, so values lie in [0, 1] and compare across
sizes: the L1 norm is divided by the number of elements, i.e. the mean absolute difference over
all channels and pixels of the map, with maps in [0, 1].

``line_f1_per_image`` adds, for sparse line maps, a score that an empty h(y) cannot win: the F1 of
h(y)'s line pixels against c's within a pixel tolerance.

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


def _extract_pair(condition: Condition, generated, controls, **extract_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked inputs -> (h(y) [B, C, H, W], c expanded to [B, C, H, W]), on the images' device."""
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
    return condition.extract_from(images, **extract_kwargs).to(images.device), control


def fidelity_per_image(condition: str | Condition, generated, controls, **extract_kwargs: Any) -> torch.Tensor:
    """float64 [B]: the Fidelity of each generated image against its control map.

    ``generated``: images [B, 3, H, W] in [0, 1] (or anything ``to_tensor`` takes);
    ``controls``: the maps the images were generated from, [B, C, H, W] (or [1, C, H, W] for all).
    """
    condition = _resolve(condition)
    extracted, control = _extract_pair(condition, generated, controls, **extract_kwargs)
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


def line_scores(extracted: torch.Tensor, control: torch.Tensor, *, threshold: float = 0.3, tolerance: int = 1) -> dict[str, torch.Tensor]:
    """float64 [B] precision, recall and F1 of the line pixels of ``extracted`` against those of ``control``.

    A line pixel is one whose mean over channels exceeds ``threshold``. Precision: the share of
    extracted line pixels within ``tolerance`` pixels (Chebyshev distance) of a control line pixel;
    recall: the share of control line pixels within ``tolerance`` of an extracted one. With no
    extracted lines precision is 1 (nothing wrong was drawn); with no control lines recall is 1.
    """
    if extracted.shape != control.shape or extracted.dim() != 4:
        raise ShapeError(f"expected two maps [B, C, H, W] of one shape, got {tuple(extracted.shape)} and {tuple(control.shape)}")
    if not 0 <= threshold < 1 or tolerance < 0:
        raise InputError(f"line scores need 0 <= threshold < 1 and tolerance >= 0, got {threshold} and {tolerance}")
    ours = extracted.double().mean(dim=1, keepdim=True) > threshold
    theirs = control.double().mean(dim=1, keepdim=True) > threshold

    def near(lines: torch.Tensor) -> torch.Tensor:
        if tolerance == 0:
            return lines
        return torch.nn.functional.max_pool2d(lines.double(), 2 * tolerance + 1, stride=1, padding=tolerance) > 0

    def share(hits: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        count = total.sum(dim=(1, 2, 3)).double()
        return torch.where(count > 0, (hits & total).sum(dim=(1, 2, 3)).double() / count.clamp_min(1), torch.ones_like(count))

    precision, recall = share(near(theirs), ours), share(near(ours), theirs)
    total = precision + recall
    f1 = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-12), torch.zeros_like(total))
    return {"precision": precision.cpu(), "recall": recall.cpu(), "f1": f1.cpu()}


def line_f1_per_image(condition: str | Condition, generated, controls, *, threshold: float = 0.3, tolerance: int = 1,
                      **extract_kwargs: Any) -> torch.Tensor:  # fmt: skip
    """float64 [B]: the line F1 of h(y) against c per image (for sparse line maps: sketch, canny, hed).

    On such maps Fidelity's L1 mostly counts line pixels, so an empty h(y) scores well; F1 asks
    which of c's lines were drawn and which drawn lines are in c (``line_scores``).
    """
    condition = _resolve(condition)
    if isinstance(condition, MaskCondition):
        raise InputError("line F1 compares line maps; the mask condition's map is an image and a mask")
    extracted, control = _extract_pair(condition, generated, controls, **extract_kwargs)
    return line_scores(extracted, control, threshold=threshold, tolerance=tolerance)["f1"]
