"""Image datasets for training and evaluation: image folders, webdataset-style tar shards, or any torch Dataset.

Every dataset yields dicts ``{"image": [3,H,W] float in [0,1], "caption": str, "controls":
{key: [C,H,W]}}``; ``controls`` holds the precomputed control maps found for the sample (maps
that are missing are made on the fly by a condition plugin, see ``ccm_sdk.training.controls``).

Layouts:

- folder: ``a.png`` + ``a.txt``, control maps in ``<key>/a.png``; or a ``metadata.jsonl`` with
  ``{"file_name": "a.png", "text": "...", "<key>": "<key>/a.png"}`` per line.
- tar shards: members grouped by basename up to the first dot, ``a.png``/``a.jpg`` + ``a.txt``
  (+ ``a.<key>.png``), as webdataset writes them.

Sizes: with ``resolution`` every image (and its maps) is resized so its shorter side is
``resolution`` and center-cropped to a square; without it all images must share one size. Each
item also records ``original_size`` (height, width before resizing) and ``crop_top_left`` (the
crop's top-left corner in the resized image), which SDXL's size/crop conditioning takes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from . import images as image_utils
from .errors import ChannelMismatchError, ImageSizeError, TrainingError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class _Record:
    """Where one sample's parts live (paths for folders, (shard, member) for tars)."""

    image: Any
    caption: Any  # a str, or a location to read it from, or None
    controls: dict[str, Any]


def _decode(data: bytes | Path, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TrainingError(f"cannot read image {what}: {exc}") from None


def _image_size(source: Path | IO[bytes], what: str) -> tuple[int, int]:
    """(height, width) from the header only."""
    try:
        with Image.open(source) as image:
            return image.height, image.width
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TrainingError(f"cannot read image {what}: {exc}") from None


def fit_geometry(height: int, width: int, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized size, crop top-left) of :func:`fit_to_resolution` for a ``height`` x ``width`` image."""
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    return size, ((size[0] - resolution) // 2, (size[1] - resolution) // 2)


def fit_to_resolution(tensor: torch.Tensor, resolution: int) -> torch.Tensor:
    """[C,H,W] -> [C,resolution,resolution]: shorter side resized to ``resolution``, then center crop."""
    size, (top, left) = fit_geometry(*tensor.shape[-2:], resolution)
    tensor = image_utils.resize(tensor[None], size)[0].clamp(0, 1)
    return tensor[:, top : top + resolution, left : left + resolution]


def _geometry(image: torch.Tensor, resolution: int | None) -> dict[str, tuple[int, int]]:
    """An item's ``original_size`` and ``crop_top_left`` for an image [C,H,W] before fitting."""
    height, width = (int(v) for v in image.shape[-2:])
    crop = (0, 0) if resolution is None else fit_geometry(height, width, resolution)[1]
    return {"original_size": (height, width), "crop_top_left": crop}


class _RecordDataset(Dataset):
    """Shared loading for the folder and tar layouts."""

    def __init__(self, records: list[_Record], *, source: str, resolution: int | None, default_caption: str | None):
        if not records:
            raise TrainingError(f"dataset {source!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.records, self.source = records, source
        self.resolution, self.default_caption = resolution, default_caption
        if resolution is None:
            self._check_uniform_sizes()

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, location: Any) -> bytes | Path:
        return location

    def _open(self, location: Any) -> Path | IO[bytes]:
        """Something PIL can read lazily (only the header when just the size is wanted)."""
        return location

    def _what(self, location: Any) -> str:
        return repr(str(location))

    def _check_uniform_sizes(self) -> None:
        sizes: dict[tuple[int, int], str] = {}
        for record in self.records:
            size = _image_size(self._open(record.image), self._what(record.image))
            sizes.setdefault(size, self._what(record.image))
            if len(sizes) > 1:
                listed = ", ".join(f"{name} is {h}x{w}" for (h, w), name in sizes.items())
                raise ImageSizeError(
                    f"images in dataset {self.source!r} have different sizes ({listed}); "
                    "set data.resolution to resize and center-crop them to one square size"
                )

    def _caption(self, record: _Record) -> str:
        if isinstance(record.caption, str):
            return record.caption
        if record.caption is not None:
            data = self._read(record.caption)
            return (data if isinstance(data, bytes) else data.read_bytes()).decode("utf-8").strip()
        if self.default_caption is None:
            raise TrainingError(
                f"image {self._what(record.image)} in dataset {self.source!r} has no caption; add one or set data.default_caption"
            )
        return self.default_caption

    def _tensor(self, location: Any, *, rgb: bool, fit: bool = True) -> torch.Tensor:
        what = self._what(location)
        image = _decode(self._read(location), what)
        if rgb and image.mode != "RGB":
            image = image.convert("RGB")
        tensor = image_utils.to_tensor(image)[0]
        if fit and self.resolution is not None:
            tensor = fit_to_resolution(tensor, self.resolution)
        return tensor

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = self._tensor(record.image, rgb=True, fit=False)
        geometry = _geometry(image, self.resolution)
        if self.resolution is not None:
            image = fit_to_resolution(image, self.resolution)
        controls = {}
        for key, location in record.controls.items():
            control = self._tensor(location, rgb=False)
            if control.shape[-2:] != image.shape[-2:]:
                raise ImageSizeError(
                    f"control map {self._what(location)} is {tuple(control.shape[-2:])} but its image is {tuple(image.shape[-2:])}"
                )
            controls[key] = control
        return {"image": image, "caption": self._caption(record), "controls": controls, **geometry}


class ImageFolderDataset(_RecordDataset):
    """A folder of images with captions (``a.txt`` beside ``a.png``, or ``metadata.jsonl``)."""

    def __init__(self, root: str | os.PathLike, *, control_keys: Sequence[str] = (), resolution: int | None = None,
                 default_caption: str | None = None):  # fmt: skip
        root = Path(root)
        if not root.is_dir():
            raise TrainingError(f"dataset folder {str(root)!r} does not exist or is not a folder")
        metadata = root / "metadata.jsonl"
        records = self._from_metadata(root, metadata, control_keys) if metadata.is_file() else self._from_files(root, control_keys)
        super().__init__(records, source=str(root), resolution=resolution, default_caption=default_caption)

    @staticmethod
    def _from_files(root: Path, control_keys: Sequence[str]) -> list[_Record]:
        records = []
        for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
            caption = path.with_suffix(".txt")
            controls = {}
            for key in control_keys:
                found = [root / key / path.name, *((root / key / (path.stem + ext)) for ext in IMAGE_EXTENSIONS)]
                match = next((c for c in found if c.is_file()), None)
                if match is not None:
                    controls[key] = match
            records.append(_Record(path, caption if caption.is_file() else None, controls))
        return records

    @staticmethod
    def _from_metadata(root: Path, metadata: Path, control_keys: Sequence[str]) -> list[_Record]:
        records = []
        for number, line in enumerate(metadata.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = entry["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TrainingError(f"{str(metadata)!r} line {number}: expected a JSON object with 'file_name'") from None
            if not (root / name).is_file():
                raise TrainingError(f"{str(metadata)!r} line {number}: {name!r} does not exist in {str(root)!r}")
            caption = entry.get("text", entry.get("caption"))
            controls = {key: root / entry[key] for key in control_keys if entry.get(key)}
            records.append(_Record(root / name, caption, controls))
        return records


class TarShardDataset(_RecordDataset):
    """Webdataset-style tar shards read with :mod:`tarfile`; members are indexed once, read on demand."""

    def __init__(self, shards: Sequence[str | os.PathLike], *, control_keys: Sequence[str] = (), resolution: int | None = None,
                 default_caption: str | None = None):  # fmt: skip
        self.shards = [str(s) for s in shards]
        self._handles: dict[int, tuple[int, tarfile.TarFile]] = {}
        records = []
        for shard_index, shard in enumerate(self.shards):
            try:
                with tarfile.open(shard) as tar:
                    members = [m for m in tar.getmembers() if m.isfile()]
            except (tarfile.TarError, OSError) as exc:
                raise TrainingError(f"cannot read tar shard {shard!r}: {exc}") from None
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in members:
                directory, _, base = member.name.rpartition("/")
                key, dot, extension = base.partition(".")
                if dot:
                    groups.setdefault(f"{directory}/{key}", {})[extension.lower()] = member
            for key in sorted(groups):
                parts = groups[key]
                image = next((parts[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in parts), None)
                if image is None:
                    continue
                controls = {k: (shard_index, parts[f"{k}.png"]) for k in control_keys if f"{k}.png" in parts}
                caption = (shard_index, parts["txt"]) if "txt" in parts else None
                records.append(_Record((shard_index, image), caption, controls))
        super().__init__(records, source=", ".join(self.shards), resolution=resolution, default_caption=default_caption)

    def _tar(self, shard_index: int) -> tarfile.TarFile:
        # one handle per shard and process: DataLoader workers must not share file offsets
        pid, handle = self._handles.get(shard_index, (None, None))
        if pid != os.getpid():
            handle = tarfile.open(self.shards[shard_index])
            self._handles[shard_index] = (os.getpid(), handle)
        return handle

    def _read(self, location: tuple[int, tarfile.TarInfo]) -> bytes:
        shard_index, member = location
        return self._tar(shard_index).extractfile(member).read()

    def _open(self, location: tuple[int, tarfile.TarInfo]) -> IO[bytes]:
        shard_index, member = location
        return self._tar(shard_index).extractfile(member)

    def _what(self, location: tuple[int, tarfile.TarInfo]) -> str:
        return f"{location[1].name!r} in {self.shards[location[0]]!r}"

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}


class TorchDataset(Dataset):
    """Any torch Dataset whose items are dicts (``image``, ``caption``, optional ``control``/``controls``)
    or ``(image, caption)`` pairs, with images as PIL, arrays or tensors in [0, 1]."""

    def __init__(self, dataset: Dataset, *, control_key: str = "control", resolution: int | None = None):
        try:
            size = len(dataset)
        except TypeError:
            raise TrainingError(f"the dataset ({type(dataset).__name__}) must have a length (a map-style torch Dataset)") from None
        if size == 0:
            raise TrainingError(f"the dataset ({type(dataset).__name__}) is empty")
        self.dataset, self.control_key, self.resolution = dataset, control_key, resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def _tensor(self, value: Any, what: str) -> torch.Tensor:
        tensor = image_utils.to_tensor(value)
        if tensor.shape[0] != 1:
            raise ImageSizeError(f"{what} should be one image, got a batch of {tensor.shape[0]}")
        tensor = tensor[0]
        return fit_to_resolution(tensor, self.resolution) if self.resolution is not None else tensor

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if isinstance(item, (tuple, list)) and len(item) == 2:
            item = {"image": item[0], "caption": item[1]}
        if not isinstance(item, dict) or "image" not in item or "caption" not in item:
            raise TrainingError(f"dataset item {index} should be a dict with 'image' and 'caption' (or a pair), got {type(item).__name__}")
        image = image_utils.to_tensor(item["image"])
        geometry = _geometry(image, self.resolution)
        image = image_utils.to_rgb(self._tensor(image, f"dataset item {index}")[None])[0]
        controls = dict(item.get("controls") or {})
        if item.get("control") is not None:
            controls[self.control_key] = item["control"]
        out = {
            "image": image,
            "caption": str(item["caption"]),
            "controls": {k: self._tensor(v, f"control {k!r} of dataset item {index}") for k, v in controls.items()},
            **geometry,
        }
        parameters = item.get("latent_parameters")
        if parameters is not None:
            out["latent_parameters"] = self._latent_parameters(parameters, index)
        if item.get("regions") is not None or item.get("word_regions") is not None:
            out.update(self._grounding(item, index, tuple(image.shape[-2:])))
        return out

    @staticmethod
    def _grounding(item: dict[str, Any], index: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``regions`` [H, W] and ``word_regions`` [n_words] (t2i's grounding loss), checked: both given, integer
        ids, regions at the image's size (a region map cannot follow a resize or crop)."""
        regions, words = item.get("regions"), item.get("word_regions")
        if regions is None or words is None:
            raise TrainingError(f"dataset item {index} has {'word_regions' if regions is None else 'regions'} but not "
                                f"{'regions' if regions is None else 'word_regions'}; token grounding needs both")  # fmt: skip
        regions, words = torch.as_tensor(regions), torch.as_tensor(words)
        if regions.dtype.is_floating_point or words.dtype.is_floating_point:
            raise TrainingError(f"dataset item {index}: regions and word_regions should be integer ids, got {regions.dtype} and {words.dtype}")
        if tuple(regions.shape) != size or words.ndim != 1:
            raise TrainingError(
                f"dataset item {index}: expected regions of the image's size {size[0]}x{size[1]} and word_regions of one "
                f"dimension, got regions {tuple(regions.shape)} and word_regions {tuple(words.shape)} (set no data.resolution "
                "that resizes these images: a region map cannot follow the resize)"
            )
        return {"regions": regions.long(), "word_regions": words.long()}

    def _latent_parameters(self, value: Any, index: int) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim != 3:
            got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TrainingError(f"latent_parameters of dataset item {index} should be a float tensor [2C, h, w], got {got}")
        if self.resolution is not None:
            raise TrainingError("data.resolution resizes the images, so precomputed latent_parameters would not match them")
        if not torch.isfinite(value).all():
            raise TrainingError(f"latent_parameters of dataset item {index} contain NaN or infinite values")
        return value.float()


class RecaptionedDataset(Dataset):
    """Another dataset with every caption replaced (DreamBooth's instance and class prompts)."""

    def __init__(self, dataset: Dataset, caption: str):
        self.dataset, self.caption = dataset, caption

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "caption": self.caption}


def open_dataset(
    path: str | os.PathLike, *, control_keys: Sequence[str] = (), resolution: int | None = None, default_caption: str | None = None
) -> Dataset:
    """A folder of images, one ``.tar`` shard, or a folder of ``.tar`` shards."""
    path = Path(path)
    kwargs = dict(control_keys=control_keys, resolution=resolution, default_caption=default_caption)
    if path.is_file() and path.suffix == ".tar":
        return TarShardDataset([path], **kwargs)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()) or (path / "metadata.jsonl").is_file()
        if shards and not has_images:
            return TarShardDataset(shards, **kwargs)
        return ImageFolderDataset(path, **kwargs)
    if not path.exists():
        raise TrainingError(f"dataset {str(path)!r} does not exist")
    raise TrainingError(f"dataset {str(path)!r} is neither a folder nor a .tar shard")


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one micro-batch; images (and each key's maps) must share one size."""
    sizes = {tuple(item["image"].shape) for item in items}
    if len(sizes) > 1:
        raise ImageSizeError(f"images in one batch have different sizes {sorted(sizes)}; set data.resolution to resize them to one size")
    keys = set().union(*(item["controls"] for item in items))
    controls: dict[str, list[torch.Tensor | None]] = {k: [item["controls"].get(k) for item in items] for k in sorted(keys)}
    for key, maps in controls.items():
        channels = {m.shape[0] for m in maps if m is not None}
        if len(channels) > 1:
            raise ChannelMismatchError(f"control maps {key!r} in one batch have different channel counts {sorted(channels)}")
    batch = {
        "images": torch.stack([item["image"] for item in items]),
        "captions": [item["caption"] for item in items],
        "controls": controls,
    }
    with_latents = sum(item.get("latent_parameters") is not None for item in items)
    if with_latents:
        if with_latents != len(items):
            raise TrainingError(f"{len(items) - with_latents} of {len(items)} items in one batch have no latent_parameters; give all or none")
        batch["latent_parameters"] = torch.stack([item["latent_parameters"] for item in items])
    grounded = sum(item.get("regions") is not None and item.get("word_regions") is not None for item in items)
    if grounded:  # token grounding (training/grounding.py): region ids per pixel, and per caption word
        if grounded != len(items):
            raise TrainingError(f"{len(items) - grounded} of {len(items)} items in one batch have no regions / word_regions; give all or none")
        batch["regions"] = torch.stack([torch.as_tensor(item["regions"]).long() for item in items])
        batch["word_regions"] = [torch.as_tensor(item["word_regions"]).long() for item in items]
    for key, name in (("original_size", "original_sizes"), ("crop_top_left", "crop_top_lefts")):
        if all(item.get(key) is not None for item in items):  # [B, 2] (height, width) / (top, left)
            batch[name] = torch.tensor([list(item[key]) for item in items], dtype=torch.long)
    return batch
