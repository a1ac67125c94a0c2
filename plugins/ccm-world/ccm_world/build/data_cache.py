"""The world's training scenes rendered once, with their VAE posteriors, for the stages after the teacher.

Rendering a 64x64 scene (4 ms) and encoding it with the VAE (3.4 ms) took half of every ControlNet
training step, and sixteen stages (the LCM, the ControlNets, the adapter, the feature and depth
nets) drew the same scenes. The cache stores each scene's image and control maps as uint8 (they
are on the 1/255 grid, so this is exact) and its VAE posterior's ``parameters`` (mean and
log-variance) as float32, in chunks of ``chunk`` scenes:

    <folder>/cache.json                 what the cache holds (sizes, conditions, chunking)
    <folder>/chunk-00000/image.npy      uint8 [n, 3, H, W]
    <folder>/chunk-00000/<condition>.npy  uint8 [n, C, H, W]
    <folder>/chunk-00000/latents.npy    float32 [n, 2 * latent_channels, h, w]
    <folder>/chunk-00000/labels.npy     uint8 [n, len(ATTRIBUTE_NAMES)] (the multi-hot scene attributes)
    <folder>/chunk-00000/captions.json
    <folder>/chunk-00000/regions.npy    uint8 [n, H, W] (with grounding: the label map, 0 background, k + 1 object k)
    <folder>/chunk-00000/word_regions.json  (with grounding: each caption word's region, -1 none)

A chunk is written to a temporary folder and renamed, so an interrupted build resumes at the first
missing chunk. :class:`CachedWorldDataset` serves the items the trainers read (``image``,
``caption``, ``controls``, ``labels``, ``index``, ``latent_parameters``, and with ``grounding`` the
``regions`` and ``word_regions`` of t2i's grounding loss); the trainers then sample latents from the
stored posteriors instead of running the VAE.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ccm_sdk.errors import InputError, TrainingError
from ccm_sdk.utils.atomic import atomic_folder, write_json_atomic

from ..dataset import ATTRIBUTE_NAMES, CONTROL_CHANNELS, WorldDataset

MANIFEST = "cache.json"
FORMAT = 1
# k / 255 exactly as the renderer's quantize() computes it (float64 division, then float32)
_FROM_UINT8 = torch.from_numpy((np.arange(256) / 255.0).astype(np.float32))


def _chunk_dir(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:05d}"


def _from_uint8(array: np.ndarray) -> torch.Tensor:
    return _FROM_UINT8[torch.from_numpy(np.array(array)).long()]


def _to_uint8(tensor: torch.Tensor, what: str) -> np.ndarray:
    scaled = tensor.double() * 255.0
    rounded = scaled.round()
    if not torch.equal(_FROM_UINT8[rounded.clamp(0, 255).long()], tensor):
        raise InputError(f"{what} is not on the 1/255 grid, so it cannot be cached as uint8 exactly")
    return rounded.to(torch.uint8).numpy()


def scene_bytes(dataset: WorldDataset, vae: torch.nn.Module) -> int:
    """Bytes one cached scene takes: uint8 image, maps and labels, float32 posterior."""
    pixels = dataset.height * dataset.width
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = 2 * vae.config.latent_channels * (dataset.height // factor) * (dataset.width // factor) * 4
    regions = pixels if dataset.grounding else 0
    return 3 * pixels + sum(CONTROL_CHANNELS[c] for c in dataset.conditions) * pixels + len(ATTRIBUTE_NAMES) + latent + regions


class _Rendered:
    """A batch of scenes as the cache stores them; made in a DataLoader worker, so rendering overlaps encoding."""

    def __init__(self, items: list[dict[str, Any]], conditions: Sequence[str]):
        self.images = torch.stack([item["image"] for item in items])
        grounding = "regions" in items[0]
        self.arrays: dict[str, list[np.ndarray]] = {"image": [], "labels": [], **{name: [] for name in conditions}}
        if grounding:
            self.arrays["regions"] = []
        for item in items:
            self.arrays["image"].append(_to_uint8(item["image"], f"the image of scene {item['index']}"))
            self.arrays["labels"].append(item["labels"].numpy().astype(np.uint8))
            for name in conditions:
                self.arrays[name].append(_to_uint8(item["controls"][name], f"the {name} map of scene {item['index']}"))
            if grounding:
                self.arrays["regions"].append(item["regions"].numpy().astype(np.uint8))
        self.captions = [item["caption"] for item in items]
        self.word_regions = [item["word_regions"].tolist() for item in items] if grounding else None


class _Collate:
    def __init__(self, conditions: Sequence[str]):
        self.conditions = tuple(conditions)

    def __call__(self, items: list[dict[str, Any]]) -> _Rendered:
        return _Rendered(items, self.conditions)


def build_data_cache(
    dataset: WorldDataset,
    vae: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    chunk: int = 5000,
    batch_size: int = 64,
    workers: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Render every scene of ``dataset`` with its conditions and encode it with ``vae`` (on the VAE's
    device); resumes by chunk. ``workers`` > 0 renders in that many DataLoader processes while this
    one encodes (the same bytes)."""
    from tqdm.auto import tqdm

    if chunk < 1 or batch_size < 1 or workers < 0:
        raise InputError(f"expected chunk >= 1, batch_size >= 1 and workers >= 0, got {chunk}, {batch_size} and {workers}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "length": len(dataset),
        "size": [dataset.height, dataset.width],
        "seed": dataset.seed,
        "conditions": list(dataset.conditions),
        "chunk": chunk,
        "latent_channels": int(vae.config.latent_channels),
    }
    if dataset.grounding:  # absent otherwise: caches built before the option stay valid
        manifest["grounding"] = True
    found = folder / MANIFEST
    if found.is_file() and json.loads(found.read_text()) != manifest:
        raise InputError(f"{found} describes another cache ({found.read_text()!r}); remove {folder} to rebuild it")
    write_json_atomic(found, manifest, indent=1)
    chunks = (len(dataset) + chunk - 1) // chunk
    done = sum(_chunk_dir(folder, i).is_dir() for i in range(chunks))
    needed = max(0, len(dataset) - done * chunk) * scene_bytes(dataset, vae)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise InputError(f"the data cache needs {needed / 1e9:.1f} GB more in {str(folder)!r}, but only {free / 1e9:.1f} GB are free")
    if done:
        log(f"    data cache: {done} of {chunks} chunks already built")
    bar = tqdm(total=len(dataset), initial=done * chunk, desc="data cache", unit="scene", disable=None)
    for c in range(chunks):
        target = _chunk_dir(folder, c)
        if target.is_dir():
            continue
        indices = range(c * chunk, min(len(dataset), (c + 1) * chunk))
        arrays: dict[str, list[np.ndarray]] = {"image": [], "labels": [], **{name: [] for name in dataset.conditions}}
        if dataset.grounding:
            arrays["regions"] = []
        captions, latents, word_regions = [], [], []
        batches = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                              collate_fn=_Collate(dataset.conditions), num_workers=workers)  # fmt: skip
        for batch in batches:
            for name, parts in batch.arrays.items():
                arrays[name] += parts
            captions += batch.captions
            word_regions += batch.word_regions or []
            with torch.no_grad():
                images = batch.images.to(next(vae.parameters()).device)
                latents.append(vae.encode(images * 2 - 1).latent_dist.parameters.float().cpu().numpy())
            bar.update(len(batch.captions))
        with atomic_folder(target) as partial:  # a chunk cut off while being written is made again
            for name, parts in arrays.items():
                np.save(partial / f"{name}.npy", np.stack(parts))
            np.save(partial / "latents.npy", np.concatenate(latents))
            (partial / "captions.json").write_text(json.dumps(captions))
            if dataset.grounding:
                (partial / "word_regions.json").write_text(json.dumps(word_regions))
        log(f"    data cache: chunk {c + 1} of {chunks} written ({len(indices)} scenes)")
    bar.close()
    return folder


class CachedWorldDataset(Dataset):
    """The items of a :func:`build_data_cache` folder that the trainers read, for ``conditions``."""

    def __init__(self, folder: str | os.PathLike, conditions: Sequence[str] = (), *, grounding: bool = False):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise TrainingError(f"no data cache in {str(self.folder)!r} (expected {MANIFEST}); build it with the data-cache stage")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TrainingError(f"{path} is not valid JSON: {exc}") from None
        if self.manifest.get("format") != FORMAT:
            raise InputError(f"{path} has cache format {self.manifest.get('format')!r}, expected {FORMAT}")
        missing = [c for c in conditions if c not in self.manifest["conditions"]]
        if missing:
            raise InputError(f"the data cache in {str(self.folder)!r} holds {self.manifest['conditions']}, not {missing}")
        if grounding and not self.manifest.get("grounding"):
            raise InputError(f"the data cache in {str(self.folder)!r} was built without grounding (regions and word_regions); "
                             "rebuild it from a WorldDataset(grounding=True)")  # fmt: skip
        self.conditions, self.grounding = tuple(conditions), bool(grounding)
        self.length, self.chunk = int(self.manifest["length"]), int(self.manifest["chunk"])
        chunks = (self.length + self.chunk - 1) // self.chunk
        absent = [i for i in range(chunks) if not _chunk_dir(self.folder, i).is_dir()]
        if absent:
            raise TrainingError(f"the data cache in {str(self.folder)!r} is incomplete: chunk {absent[0]} of {chunks} is missing")
        self._open: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.length

    def _chunk(self, index: int) -> dict[str, Any]:
        if index not in self._open:
            where = _chunk_dir(self.folder, index)
            names = ("image", "labels", "latents", *self.conditions, *(("regions",) if self.grounding else ()))
            try:
                arrays: dict[str, Any] = {name: np.load(where / f"{name}.npy", mmap_mode="r") for name in names}
                arrays["captions"] = json.loads((where / "captions.json").read_text())
                if self.grounding:
                    arrays["word_regions"] = json.loads((where / "word_regions.json").read_text())
            except (OSError, ValueError) as exc:
                raise TrainingError(f"the data cache chunk {str(where)!r} cannot be read: {exc}") from None
            self._open[index] = arrays
        return self._open[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside this data cache of length {self.length}")
        arrays, row = self._chunk(index // self.chunk), index % self.chunk
        controls = {}
        for name in self.conditions:
            control = _from_uint8(arrays[name][row])
            if control.shape[0] != CONTROL_CHANNELS[name]:
                raise TrainingError(f"the cached {name} maps have {control.shape[0]} channels, expected {CONTROL_CHANNELS[name]}")
            controls[name] = control
        item = {
            "image": _from_uint8(arrays["image"][row]),
            "caption": arrays["captions"][row],
            "controls": controls,
            "labels": torch.from_numpy(np.array(arrays["labels"][row])).float(),
            "index": index,
            "latent_parameters": torch.from_numpy(np.array(arrays["latents"][row])),
        }
        if self.grounding:
            item["regions"] = torch.from_numpy(np.array(arrays["regions"][row])).long()
            item["word_regions"] = torch.tensor(arrays["word_regions"][row], dtype=torch.long)
        return item

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}  # memory maps reopen in each DataLoader worker
