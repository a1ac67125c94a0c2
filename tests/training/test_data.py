"""Datasets (folder, metadata.jsonl, tar shards, torch Datasets), the step-indexed batch order,
and control maps from the data or from a condition plugin."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk.errors import TrainingError
from ccm_sdk.training.batches import JointBatches, StepBatches
from ccm_sdk.training.controls import ControlSource
from ccm_sdk.training.data import (
    ImageFolderDataset,
    TarShardDataset,
    TorchDataset,
    collate,
    fit_to_resolution,
    open_dataset,
)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard_from_folder(folder, path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            _add(tar, f"part/{name}.png", (folder / f"{name}.png").read_bytes())
            _add(tar, f"part/{name}.txt", (folder / f"{name}.txt").read_bytes())
            _add(tar, f"part/{name}.control.png", (folder / "control" / f"{name}.png").read_bytes())
    return path


def test_folder_with_captions_and_control_maps(squares):
    dataset = ImageFolderDataset(squares, control_keys=["control"])
    assert len(dataset) == 8
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["caption"] == "a red square"
    assert item["controls"]["control"].shape == (3, 32, 32)
    assert set(ImageFolderDataset(squares)[0]["controls"]) == set()  # maps are read only when asked for


def test_metadata_jsonl(tmp_path, make_squares):
    folder = make_squares(tmp_path / "m", count=3, control_key="edges")
    lines = [{"file_name": f"img{i}.png", "text": f"caption {i}", "edges": f"edges/img{i}.png"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dataset = open_dataset(folder, control_keys=["edges"])
    assert [dataset[i]["caption"] for i in range(3)] == ["caption 0", "caption 1", "caption 2"]
    assert torch.equal(dataset[1]["controls"]["edges"], ImageFolderDataset(folder, control_keys=["edges"])[1]["controls"]["edges"])


def test_tar_shards_match_the_folder(tmp_path, squares):
    folder = ImageFolderDataset(squares, control_keys=["control"])
    names = [f"img{i}" for i in range(8)]
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard_from_folder(squares, shards / "000.tar", names[:5])
    _shard_from_folder(squares, shards / "001.tar", names[5:])
    dataset = open_dataset(shards, control_keys=["control"])
    assert isinstance(dataset, TarShardDataset) and len(dataset) == 8
    for i in (0, 6):
        ours, theirs = dataset[i], folder[i]
        assert ours["caption"] == theirs["caption"]
        assert torch.equal(ours["image"], theirs["image"])
        assert torch.equal(ours["controls"]["control"], theirs["controls"]["control"])
    single = open_dataset(shards / "001.tar")
    assert len(single) == 3 and single[0]["controls"] == {}


def test_tar_samples_without_an_image_are_skipped(tmp_path, squares):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.png", (squares / "img0.png").read_bytes())
        _add(tar, "a.txt", b"only one")
        _add(tar, "b.txt", b"caption without image")
    dataset = TarShardDataset([path])
    assert len(dataset) == 1 and dataset[0]["caption"] == "only one"


def test_resolution_resizes_and_center_crops_images_and_maps(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "control").mkdir()
    for name, (h, w) in {"wide": (32, 64), "tall": (48, 24)}.items():
        array = np.zeros((h, w, 3), np.uint8)
        array[:, w // 2 :] = 255  # right half white
        Image.fromarray(array).save(folder / f"{name}.png")
        Image.fromarray(array).save(folder / "control" / f"{name}.png")
        (folder / f"{name}.txt").write_text(name)
    dataset = ImageFolderDataset(folder, control_keys=["control"], resolution=16)
    for item in (dataset[0], dataset[1]):
        assert item["image"].shape == (3, 16, 16) and item["controls"]["control"].shape == (3, 16, 16)
    wide = dataset[1]["image"]  # sorted: tall, wide; the crop keeps the centre, where black meets white
    assert wide[:, :, 0].max() < 0.05 and wide[:, :, -1].min() > 0.95
    assert fit_to_resolution(torch.rand(3, 20, 10), 8).shape == (3, 8, 8)


def test_missing_caption_is_an_error_unless_a_default_is_set(tmp_path, make_squares):
    folder = make_squares(tmp_path / "nocap", count=2)
    (folder / "img1.txt").unlink()
    with pytest.raises(TrainingError, match="img1.png.*has no caption.*default_caption"):
        ImageFolderDataset(folder)[1]
    assert ImageFolderDataset(folder, default_caption="a square")[1]["caption"] == "a square"


def test_torch_dataset_of_pairs_and_dicts():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            image = Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8))
            return (image, f"p{i}") if i % 2 else {"image": torch.full((3, 16, 16), 0.5), "caption": "d", "control": torch.zeros(1, 16, 16)}

    dataset = TorchDataset(Pairs(), control_key="edges")
    batch = collate([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 3, 16, 16) and batch["captions"] == ["d", "p1"]
    assert batch["controls"]["edges"][0].shape == (1, 16, 16) and batch["controls"]["edges"][1] is None


def test_step_batches_are_a_function_of_the_step():
    full = StepBatches(10, 3, seed=5, stop=8)
    batches = list(full)
    assert batches == list(StepBatches(10, 3, seed=5, stop=8)) and len(batches) == 8
    assert list(StepBatches(10, 3, seed=5, start=5, stop=8)) == batches[5:]  # resuming needs only the step
    stream = [i for b in batches for i in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # whole epochs
    assert stream[:10] != stream[10:20]  # a new permutation each epoch
    assert all(len(b) == 3 for b in StepBatches(2, 3, seed=0, stop=4))  # smaller than a batch: wraps


def test_ranks_split_each_global_batch():
    ranks = [list(StepBatches(12, 2, seed=1, rank=r, world_size=3, stop=2)) for r in range(3)]
    single = list(StepBatches(12, 6, seed=1, stop=2))
    for step in range(2):
        assert [i for r in ranks for i in r[step]] == single[step]


def test_joint_batches_concatenate_two_streams():
    joint = list(JointBatches(StepBatches(3, 2, seed=0, stop=3), StepBatches(5, 2, seed=1, stop=3, offset=3)))
    assert all(len(b) == 4 and max(b[:2]) < 3 <= min(b[2:]) for b in joint)


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
