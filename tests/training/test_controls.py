"""Control maps for training: from the data where it has them, from a condition plugin where not."""

from __future__ import annotations

import pytest
import torch

from ccm_sdk.datasets import ImageFolderDataset, collate
from ccm_sdk.training.controls import ControlSource


def test_control_source_uses_given_maps_and_computes_missing_ones(squares):
    dataset = ImageFolderDataset(squares, control_keys=["control"])
    items = [dataset[0], dataset[1]]
    items[1] = {**items[1], "controls": {}}
    batch = collate(items)
    source = ControlSource("canny", key="control")
    maps = source.maps(batch)
    assert maps.shape == (2, 3, 32, 32)
    assert torch.equal(maps[0], items[0]["controls"]["control"])
    assert torch.equal(maps[1], source.condition(batch["images"][1:])[0])


def test_mask_condition_draws_masks_from_the_training_rng(squares):
    batch = collate([ImageFolderDataset(squares)[i] for i in range(2)])
    source = ControlSource("mask", key="mask")
    torch.manual_seed(3)
    first = source.maps(batch)
    torch.manual_seed(3)
    assert first.shape == (2, 4, 32, 32) and torch.equal(first, source.maps(batch))
    assert set(first[:, 3].unique().tolist()) <= {0.0, 1.0} and first[:, 3].sum() > 0


def test_single_channel_maps_feed_three_channel_conditions(squares):
    item = ImageFolderDataset(squares)[0]
    item["controls"] = {"control": torch.ones(1, 32, 32)}
    assert ControlSource("canny", key="control").maps(collate([item])).shape == (1, 3, 32, 32)


def test_named_conditions_are_built_only_when_a_map_is_missing(squares, monkeypatch):
    """Data that brings every map needs no detector model (e.g. the world's exact depth maps)."""
    from ccm_sdk.errors import InputError
    from ccm_sdk.interfaces import Condition

    built = []

    class NeedsWeights(Condition):
        name = "needs-weights"

        def __init__(self, **options):
            built.append(options)
            super().__init__(**options)

        def preprocess(self, images, **kwargs):
            return images

    monkeypatch.setattr("ccm_sdk.training.controls.conditions.get", lambda name: NeedsWeights)
    dataset = ImageFolderDataset(squares, control_keys=["control"])
    source = ControlSource("needs-weights", key="control")
    assert source.maps(collate([dataset[0], dataset[1]])).shape == (2, 3, 32, 32)
    assert built == []  # every map came from the data
    source.maps(collate([{**dataset[0], "controls": {}}]))
    assert len(built) == 1
    with pytest.raises(InputError, match="Accepted options"):
        ControlSource("needs-weights", key="control", options={"no_such_option": 1})  # still checked up front
