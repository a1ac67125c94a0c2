"""Shape accuracy: does each object the caption names with a shape show that shape where it should be?

For a dataset that knows, per image and object, which pixels the object covers in the real image
(``visible``), which pixels may be judged (``allowed``: the object's place and the background around
it, without the other objects, which may cover or lie behind it), and the masks that each shape of
its vocabulary would cover at the object's place, size and rotation (``candidates``), the measure
segments the generated image in a box around the candidates (the bounding box of their union, widened
by ``margin`` pixels): a pixel is the object's when its colour is nearer the generated mean inside
``visible`` than the generated mean of the box's background ring (the allowed pixels that no
candidate covers). The object counts as right when the asked candidate matches that segment best
(the highest IoU over the allowed pixels of the box, strictly above every other candidate's) and at
least ``min_iou`` well. When the two means are closer than one 8-bit step in every channel the
object does not stand out and counts as wrong, so an image with no content (one flat colour) scores
0; real images score about 1 (anti-aliased edges only). Objects with fewer than ``min_pixels`` visible
pixels are left out, as in the colour measure.

A dataset opts in with a ``shape_targets(index) -> ShapeTargets`` method (the world dataset has one);
``ccm eval`` then adds a shape column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ShapeError
from .pooled import pooled_share

_SAME_COLOUR = 1.0 / 255.0  # object and background means closer than one 8-bit step in every channel: one colour


@dataclass(frozen=True)
class ShapeTargets:
    """What one image's caption asks of the shapes of its K objects (C candidate shapes each)."""

    candidates: torch.Tensor  # bool [K, C, H, W]: where each candidate shape would be, at each object's place
    asked: torch.Tensor  # long [K]: the candidate the caption asks for
    visible: torch.Tensor  # bool [K, H, W]: the object's pixels in the real image
    allowed: torch.Tensor  # bool [K, H, W]: the pixels that may be judged (the background and the object itself)

    def __post_init__(self):
        k = self.asked.shape[0] if self.asked.ndim == 1 else -1
        if (self.candidates.ndim != 4 or self.candidates.shape[0] != k or self.visible.shape != self.allowed.shape
                or tuple(self.visible.shape) != (k, *self.candidates.shape[2:])):  # fmt: skip
            raise ShapeError(
                f"expected candidates [K, C, H, W], asked [K], visible and allowed [K, H, W], got "
                f"{tuple(self.candidates.shape)}, {tuple(self.asked.shape)}, {tuple(self.visible.shape)} and {tuple(self.allowed.shape)}"
            )

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.candidates.shape[2:])


def _box(mask: torch.Tensor, margin: int) -> tuple[slice, slice]:
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    height, width = mask.shape
    return (slice(max(0, int(rows.min()) - margin), min(height, int(rows.max()) + margin + 1)),
            slice(max(0, int(cols.min()) - margin), min(width, int(cols.max()) + margin + 1)))  # fmt: skip


def object_match(image: torch.Tensor, candidates: torch.Tensor, visible: torch.Tensor, allowed: torch.Tensor, *,
                 margin: int = 2) -> torch.Tensor:  # fmt: skip
    """float [C]: each candidate's IoU with the segment of ``image`` [3, H, W] that has the object's colour."""
    union = candidates.any(0)
    if not union.any():
        return torch.zeros(candidates.shape[0])
    rows, cols = _box(union, margin)
    pixels = image[:, rows, cols].float().flatten(1).T  # [P, 3]
    judged = allowed[rows, cols].flatten().to(pixels.device)
    shown = visible[rows, cols].flatten().to(pixels.device)
    ring = judged & ~union[rows, cols].flatten().to(pixels.device)
    if not shown.any() or not ring.any():
        return torch.zeros(candidates.shape[0])
    inside, outside = pixels[shown].mean(0), pixels[ring].mean(0)
    if float((inside - outside).abs().max()) < _SAME_COLOUR:  # the object does not stand out: no segment
        return torch.zeros(candidates.shape[0])
    segment = ((pixels - inside).square().sum(1) < (pixels - outside).square().sum(1)) & judged
    masks = candidates[:, rows, cols].flatten(1).to(pixels.device) & judged
    intersection = (masks & segment).sum(1).float()
    union_counts = (masks | segment).sum(1).float()
    return torch.where(union_counts > 0, intersection / union_counts.clamp(min=1), torch.zeros_like(union_counts)).cpu()


def shape_hits(image: torch.Tensor, targets: ShapeTargets, *, min_iou: float = 0.5, min_pixels: int = 4,
               margin: int = 2) -> tuple[int, int]:  # fmt: skip
    """(right objects, scored objects) of one image [3, H, W] in [0, 1]."""
    if image.ndim != 3 or image.shape[0] != 3 or tuple(image.shape[1:]) != targets.size:
        raise ShapeError(f"expected an image [3, {', '.join(map(str, targets.size))}], got {tuple(image.shape)}")
    right = scored = 0
    for k, asked in enumerate(targets.asked.tolist()):
        if int(targets.visible[k].sum()) < min_pixels:
            continue
        iou = object_match(image, targets.candidates[k], targets.visible[k], targets.allowed[k], margin=margin)
        others = torch.cat([iou[:asked], iou[asked + 1 :]])
        right += int(bool(iou[asked] >= min_iou) and bool((others < iou[asked]).all()))
        scored += 1
    return right, scored


def shape_accuracy(images: torch.Tensor, targets: list[ShapeTargets], *, min_iou: float = 0.5, min_pixels: int = 4,
                   margin: int = 2) -> float:  # fmt: skip
    """Share of objects, over all ``images`` [N, 3, H, W] in [0, 1], that show the asked shape (NaN: none scored)."""
    def hits(image, target):
        return shape_hits(image, target, min_iou=min_iou, min_pixels=min_pixels, margin=margin)

    return pooled_share(images, targets, hits, target_name="ShapeTargets", item_name="image")
