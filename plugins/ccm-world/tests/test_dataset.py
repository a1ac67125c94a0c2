"""WorldDataset as the trainers and the eval runner consume it, and the folder layout it writes."""

from __future__ import annotations

import json

import pytest
import torch

from ccm_sdk.errors import InputError, UnknownNameError
from ccm_world import ATTRIBUTE_NAMES, CONTROL_CHANNELS, WORLD_CONDITIONS, WorldDataset


def test_item_layout():
    data = WorldDataset(size=(48, 32), length=10, seed=0)
    item = data[3]
    assert set(item) == {"image", "caption", "controls", "labels", "index", "scene"}
    assert item["image"].shape == (3, 48, 32) and item["image"].dtype == torch.float32
    assert set(item["controls"]) == set(WORLD_CONDITIONS)
    for name, control in item["controls"].items():
        assert control.shape == (CONTROL_CHANNELS[name], 48, 32), name
        assert control.min() >= 0 and control.max() <= 1
        torch.testing.assert_close(control, (control * 255).round() / 255, rtol=0, atol=1e-7)  # exact in a PNG
    assert item["labels"].shape == (len(ATTRIBUTE_NAMES),) and item["index"] == 3
    present = {name for name, on in zip(ATTRIBUTE_NAMES, item["labels"]) if on}
    scene = item["scene"]
    assert f"background:{scene['background']['color']}" in present
    assert {f"shape:{o['kind']}" for o in scene["objects"]} | {f"color:{o['color']}" for o in scene["objects"]} <= present
    json.dumps(scene)  # JSON-compatible


def test_training_collate_and_a_dataloader():
    from ccm_sdk.datasets import collate

    data = WorldDataset(size=32, length=8, seed=0, conditions=("canny", "mask"))
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)))
    assert batch["images"].shape == (4, 3, 32, 32) and len(batch["captions"]) == 4
    assert [c.shape for c in batch["controls"]["mask"]] == [(4, 32, 32)] * 4


def test_save_folder_round_trips_through_the_folder_dataset(tmp_path):
    from ccm_sdk.datasets import ImageFolderDataset

    data = WorldDataset(size=32, length=10, seed=4)
    root = data.save_folder(tmp_path / "world", 3, start=2)
    assert sorted(p.name for p in root.glob("*.png")) == ["00002.png", "00003.png", "00004.png"]
    assert (root / "control" / "mask" / "00003.png").is_file()
    assert len((root / "scenes.jsonl").read_text().splitlines()) == 3
    folder = ImageFolderDataset(root, control_keys=[f"control/{c}" for c in WORLD_CONDITIONS])
    for position, index in enumerate(range(2, 5)):
        original, loaded = data[index], folder[position]
        assert loaded["caption"] == original["caption"]
        torch.testing.assert_close(loaded["image"], original["image"], rtol=0, atol=0)
        for name in WORLD_CONDITIONS:
            torch.testing.assert_close(loaded["controls"][f"control/{name}"], original["controls"][name], rtol=0, atol=0)


def test_bad_arguments_raise():
    with pytest.raises(UnknownNameError, match="unknown world condition 'segmentation'"):
        WorldDataset(conditions=("canny", "segmentation"))
    with pytest.raises(InputError, match="at least 16x16"):
        WorldDataset(size=8)
    with pytest.raises(InputError, match="sr_factor"):
        WorldDataset(size=32, sr_factor=64)
    with pytest.raises(InputError, match="length"):
        WorldDataset(length=0)
    with pytest.raises(IndexError):
        WorldDataset(length=3)[3]
    with pytest.raises(InputError, match="n >= 1"):
        WorldDataset(length=3).save_folder("unused", 0)


def test_plugin_registers_its_conditions_dataset_and_model_source():
    from ccm_sdk.errors import MissingModelError
    from ccm_sdk.registry import conditions, datasets, get_dataset, models

    plugins = {e.name: e.plugin for e in conditions.entries()}
    assert plugins["world-edges"] == "world" and plugins["world-soft-edges"] == "world"
    assert datasets.entry("world").plugin == "world" and datasets.get("world") is WorldDataset
    data = get_dataset("world", size=32, length=2, seed=3)
    assert data[1]["image"].shape == (3, 32, 32)
    assert models.entry("world").plugin == "world"
    with pytest.raises(MissingModelError, match="no pretrained model 'nope'"):
        models.get("world")("nope")
