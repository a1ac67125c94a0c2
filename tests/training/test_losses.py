"""The distances of the consistency losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from ccm_sdk.errors import InputError
from ccm_sdk.training.losses import (
    DISTANCES,
    distance,
    l1,
    l2,
    pick_distance,
    pseudo_huber,
)

A = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
B = torch.tensor([[0.5, 1.0], [0.0, 2.0]])  # differences 0.5, 0, -2, 3


def test_l1_by_hand():
    assert l1(A, B).item() == pytest.approx((0.5 + 0 + 2 + 3) / 4)


def test_l2_by_hand():
    assert l2(A, B).item() == pytest.approx((0.25 + 0 + 4 + 9) / 4)


def test_pseudo_huber_by_hand():
    c = 0.1
    expected = sum(math.sqrt(d * d + c * c) - c for d in (0.5, 0.0, 2.0, 3.0)) / 4
    assert pseudo_huber(A, B, c).item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_huber_limits():
    """~ l2 / (2c) for differences much smaller than c, ~ l1 for much larger ones."""
    small = torch.full((4,), 1e-2)
    assert pseudo_huber(small, torch.zeros(4), 1.0).item() == pytest.approx(l2(small, torch.zeros(4)).item() / 2, rel=1e-2)
    big = torch.full((4,), 100.0)
    assert pseudo_huber(big, torch.zeros(4), 1e-3).item() == pytest.approx(100.0, rel=1e-4)


def test_distance_dispatch_and_half_precision_inputs():
    for name, fn in (("l1", l1), ("l2", l2), ("huber", lambda a, b: pseudo_huber(a, b, 0.001))):
        assert distance(name, A, B, huber_c=0.001).item() == pytest.approx(fn(A, B).item())
    assert distance("l1", A.half(), B.half()).dtype == torch.float32


def test_random_picks_every_distance_and_follows_the_generator():
    picks = [pick_distance("random", torch.Generator().manual_seed(s)) for s in range(60)]
    assert set(picks) == set(DISTANCES)
    again = [pick_distance("random", torch.Generator().manual_seed(s)) for s in range(60)]
    assert picks == again
    assert pick_distance("l2") == "l2"


@pytest.mark.parametrize("call", [lambda: distance("mse", A, B), lambda: pick_distance("cosine"),
                                  lambda: distance("l1", A, B[:1]), lambda: pseudo_huber(A, B, 0.0)])  # fmt: skip
def test_bad_distance_arguments(call):
    with pytest.raises(InputError):
        call()
