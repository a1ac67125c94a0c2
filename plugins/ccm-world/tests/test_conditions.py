"""world-edges and world-soft-edges: the Condition contract, and agreement with the ground truth."""

from __future__ import annotations

import numpy as np
import torch

from ccm_sdk import get_condition
from ccm_sdk.testing.conditions import ConditionTestBase
from ccm_world import WorldDataset


def _world_images(size, count):
    data = WorldDataset(size=size, length=count, seed=21, conditions=())
    return torch.stack([data[i]["image"] for i in range(count)])


class TestWorldEdges(ConditionTestBase):
    condition_name = "world-edges"
    roundtrip_atol = None

    def sample_images(self):
        return _world_images(self.image_size, 2) if min(self.image_size) >= 16 else super().sample_images()


class TestWorldSoftEdges(ConditionTestBase):
    condition_name = "world-soft-edges"
    atol = 1e-6


def test_edges_read_from_pixels_match_the_ground_truth():
    data = WorldDataset(size=64, length=40, seed=9, conditions=("canny", "hed"))
    edges, soft = get_condition("world-edges"), get_condition("world-soft-edges")
    agreement, soft_error = [], []
    for i in range(40):
        item = data[i]
        image = item["image"][None]
        agreement.append((edges(image)[0] == item["controls"]["canny"]).float().mean().item())
        soft_error.append((soft(image)[0] - item["controls"]["hed"]).abs().mean().item())
    assert np.mean(agreement) > 0.985 and min(agreement) > 0.96
    assert np.mean(soft_error) < 0.015


def test_a_flat_image_has_no_edges_and_a_step_one_column():
    image = torch.zeros(1, 3, 16, 16)
    assert get_condition("world-edges")(image).max() == 0
    image[..., 8:] = 0.5
    edges = get_condition("world-edges")(image)[0, 0]
    assert edges[:, 7].all() and edges.sum() == 16
