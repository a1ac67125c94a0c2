"""Datasets: folders, metadata.jsonl, tar shards and torch Datasets, resized or as they are."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk.datasets import (
    ImageFolderDataset,
    TarShardDataset,
    TorchDataset,
    collate,
    fit_to_resolution,
    open_dataset,
)
from ccm_sdk.errors import TrainingError


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


def test_items_record_the_size_before_resizing_and_the_crop(tmp_path):
    """SDXL's time ids need them: a 40x64 image at resolution 32 is resized to 32x51 and cropped at (0, 9)."""
    folder = tmp_path / "geometry"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(folder / "a.png")
    (folder / "a.txt").write_text("a")
    item = ImageFolderDataset(folder, resolution=32)[0]
    assert item["original_size"] == (40, 64) and item["crop_top_left"] == (0, 9) and item["image"].shape == (3, 32, 32)
    assert ImageFolderDataset(folder)[0]["crop_top_left"] == (0, 0)  # not resized: no crop
    wrapped = TorchDataset([{"image": torch.rand(3, 64, 40), "caption": "b"}], resolution=32)[0]
    assert wrapped["original_size"] == (64, 40) and wrapped["crop_top_left"] == (9, 0)
    batch = collate([item, item])
    assert batch["original_sizes"].tolist() == [[40, 64]] * 2 and batch["crop_top_lefts"].tolist() == [[0, 9]] * 2
    bare = {k: v for k, v in item.items() if k not in ("original_size", "crop_top_left")}
    assert "original_sizes" not in collate([item, bare])  # recorded for only some items: left out


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
