"""Pooling per-image hit counts into one share, for the prompt-following measures (colour, shape, limbs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ShapeError


def pooled_share(items: torch.Tensor, targets: Sequence[Any], hits: Callable[[torch.Tensor, Any], tuple[int, int]], *,
                 target_name: str, item_name: str) -> float:  # fmt: skip
    """Sum of ``hits(item, target)`` = (right, scored) over the batch ``items`` [N, ...] and its N targets,
    as right / scored (NaN when nothing was scored)."""
    if items.shape[0] != len(targets):
        raise ShapeError(
            f"expected one {target_name} per {item_name}, got {items.shape[0]} {item_name}s and {len(targets)} targets"
        )
    right = scored = 0
    for item, target in zip(items, targets):
        hit, count = hits(item, target)
        right, scored = right + hit, scored + count
    return right / scored if scored else float("nan")
