"""A small depth estimator for world images, so that depth Fidelity ||h(y) - c||_1 can be measured.

The world's depth ground truth is layer order (background 0, object k of n at (k + 1) / n), which
no rule reads back from pixels. ``train_depth_net`` fits :class:`WorldDepthNet`, a small
encoder-decoder with skip connections, to predict the ``depth`` map of rendered scenes from their
images (L1 loss, seeded batches, a held-out error); the ``world-depth`` condition runs the
shipped one as h. Like the world's feature net, it is trained on the world and only means
something there.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ccm_sdk.errors import CorruptWeightsError, InputError, MissingModelError, TrainingError
from ccm_sdk.interfaces import Options

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


class DepthNetConfig(Options):
    """Round-trips through config.json."""

    architecture: str = "ccm-world-depth-net"
    widths: tuple[int, ...] = Field(default=(32, 64, 128), min_length=1, description="channels per level; each level halves the size")
    groups: int = Field(default=8, ge=1, description="GroupNorm groups (an image's depth never depends on its batch)")


def _block(channels_in: int, channels_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.GroupNorm(groups, channels_out), nn.SiLU(),
        nn.Conv2d(channels_out, channels_out, 3, padding=1), nn.GroupNorm(groups, channels_out), nn.SiLU(),
    )  # fmt: skip


class WorldDepthNet(nn.Module):
    """U-Net-like: conv blocks down (stride-2 convs), nearest upsampling with skip concatenation back up, a sigmoid depth map."""

    def __init__(self, config: DepthNetConfig):
        super().__init__()
        self.config = config
        widths, groups = config.widths, config.groups
        if any(w % groups for w in widths):
            raise InputError(f"depth-net widths {list(widths)} must be divisible by groups {groups}")
        self.stem = _block(3, widths[0], groups)
        self.downs = nn.ModuleList(nn.Conv2d(widths[i], widths[i], 3, stride=2, padding=1) for i in range(len(widths) - 1))
        self.encoders = nn.ModuleList(_block(widths[i], widths[i + 1], groups) for i in range(len(widths) - 1))
        self.decoders = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i], groups) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], 1, 1)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.config.widths) - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (H, W multiples of ``factor``) -> depth [B, 1, H, W] in [0, 1], near = bright."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[-2] % self.factor or images.shape[-1] % self.factor:
            raise InputError(f"image sizes must be multiples of {self.factor}, got {tuple(images.shape[-2:])}")
        hidden = self.stem(images * 2 - 1)
        skips = []
        for down, encoder in zip(self.downs, self.encoders):
            skips.append(hidden)
            hidden = encoder(down(hidden))
        for decoder in self.decoders:
            hidden = decoder(torch.cat([F.interpolate(hidden, scale_factor=2.0, mode="nearest"), skips.pop()], dim=1))
        return torch.sigmoid(self.head(hidden))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.model_dump(mode="json"), indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> WorldDepthNet:
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise MissingModelError(f"expected a depth-net folder with {CONFIG_NAME} and {WEIGHTS_NAME} at {str(folder)!r}")
        try:
            net = cls(DepthNetConfig(**json.loads((folder / CONFIG_NAME).read_text())))
            net.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        except (ValidationError, json.JSONDecodeError, SafetensorError, RuntimeError, OSError, InputError) as exc:
            raise CorruptWeightsError(f"cannot load the depth net at {str(folder)!r}: {exc}") from None
        return net.eval()


@dataclass
class DepthNetTraining:
    """What ``train_depth_net`` returns."""

    net: WorldDepthNet
    losses: list[float] = field(default_factory=list)  # per step
    holdout_l1: float | None = None  # mean |predicted - true depth| on the held-out scenes


class _Pairs(torch.utils.data.Dataset):
    """(image, depth) of ``dataset``'s first ``count`` items; depth is the map's first channel."""

    def __init__(self, dataset, count: int):
        self.dataset, self.count = dataset, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        controls = item.get("controls") or {}
        if "depth" not in controls:
            raise InputError("dataset items need controls['depth'] (the ground-truth depth map) to train the depth net")
        return torch.as_tensor(item["image"]).float(), torch.as_tensor(controls["depth"]).float()[:1]


def train_depth_net(
    dataset,
    *,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    holdout: int = 256,
    num_workers: int = 0,
    output_dir: str | os.PathLike | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    **config: Any,
) -> DepthNetTraining:
    """Train a :class:`WorldDepthNet` on ``(item["image"], item["controls"]["depth"])`` with an L1 loss.

    The last ``holdout`` items are held out for the reported error; training draws seeded random
    batches (with replacement) from the rest, under a cosine learning-rate decay. ``config`` sets
    ``DepthNetConfig`` fields. Saves to ``output_dir`` when given.
    """
    if steps < 1 or batch_size < 1:
        raise InputError(f"expected steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    size = len(dataset)
    holdout = min(holdout, size // 4)
    train_size = size - holdout
    if train_size < 1:
        raise InputError(f"the dataset holds {size} samples; at least 1 is needed to train")
    try:
        net_config = DepthNetConfig(**config)
    except ValidationError as exc:
        raise InputError(f"invalid depth-net config: {exc}") from None
    torch.manual_seed(seed)
    net = WorldDepthNet(net_config).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    sampler = torch.utils.data.RandomSampler(
        range(train_size), replacement=True, num_samples=steps * batch_size, generator=torch.Generator().manual_seed(seed)
    )
    loader = torch.utils.data.DataLoader(_Pairs(dataset, train_size), batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    result = DepthNetTraining(net)
    for step, (images, depth) in enumerate(loader):
        loss = (net(images) - depth).abs().mean()
        if not torch.isfinite(loss):
            raise TrainingError(f"depth-net loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        result.losses.append(loss.item())
        if log is not None:
            log({"step": step, "loss": result.losses[-1], "lr": schedule.get_last_lr()[0]})
    net.eval()
    if holdout:
        pairs = _Pairs(dataset, size)
        errors = []
        with torch.no_grad():
            for start in range(train_size, size, batch_size):
                images, depth = zip(*(pairs[i] for i in range(start, min(start + batch_size, size))))
                errors.append((net(torch.stack(images)) - torch.stack(depth)).abs().flatten(1).mean(1))
        result.holdout_l1 = float(torch.cat(errors).mean())
    if output_dir is not None:
        net.save_pretrained(output_dir)
    return result
