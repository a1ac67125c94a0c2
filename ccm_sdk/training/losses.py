"""Distances d(a, b) for consistency losses, averaged over every element (or over each sample's), computed in float32.

    l1      |a - b|
    l2      (a - b)^2
    huber   sqrt((a - b)^2 + c^2) - c      (pseudo-Huber / Charbonnier)

``random`` picks one of the three per step, the paper's ablation (method doc, section 6).
"""

from __future__ import annotations

import torch

from ..errors import InputError

DISTANCES = ("l1", "l2", "huber")


def _reduce(elementwise: torch.Tensor, reduce: bool) -> torch.Tensor:
    return elementwise.mean() if reduce else elementwise.flatten(1).mean(1)


def l1(a: torch.Tensor, b: torch.Tensor, *, reduce: bool = True) -> torch.Tensor:
    return _reduce((a.float() - b.float()).abs(), reduce)


def l2(a: torch.Tensor, b: torch.Tensor, *, reduce: bool = True) -> torch.Tensor:
    return _reduce((a.float() - b.float()).square(), reduce)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.001, *, reduce: bool = True) -> torch.Tensor:
    if not c > 0:
        raise InputError(f"expected a pseudo-Huber c > 0, got {c}")
    return _reduce(((a.float() - b.float()).square() + c * c).sqrt().sub(c), reduce)


def distance(name: str, a: torch.Tensor, b: torch.Tensor, *, huber_c: float = 0.001, reduce: bool = True) -> torch.Tensor:
    """d(a, b) for a concrete distance name (pick ``random`` first with :func:`pick_distance`); a scalar, or
    with ``reduce=False`` one value per sample (the mean over its elements)."""
    if a.shape != b.shape:
        raise InputError(f"distance needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if name == "l1":
        return l1(a, b, reduce=reduce)
    if name == "l2":
        return l2(a, b, reduce=reduce)
    if name == "huber":
        return pseudo_huber(a, b, huber_c, reduce=reduce)
    raise InputError(f"expected a distance in {DISTANCES}, got {name!r}")


def pick_distance(name: str, generator: torch.Generator | None = None) -> str:
    """``name`` itself, or for ``random`` one of :data:`DISTANCES` drawn uniformly."""
    if name == "random":
        return DISTANCES[int(torch.randint(len(DISTANCES), (), generator=generator))]
    if name not in DISTANCES:
        raise InputError(f"expected a distance in {DISTANCES} or 'random', got {name!r}")
    return name
