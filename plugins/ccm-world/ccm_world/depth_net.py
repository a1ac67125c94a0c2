"""A small depth estimator for world images, so that depth Fidelity ||h(y) - c||_1 can be measured.

The world's depth ground truth is layer order (background 0, object k of n at (k + 1) / n), which
no rule reads back from pixels. ``train_depth_net`` fits :class:`WorldDepthNet`, a small
encoder-decoder with skip connections, to predict the ``depth`` map of rendered scenes from their
images (L1 loss, seeded batches, a held-out error); the ``world-depth`` condition runs the
shipped one as h. Like the world's feature net, it is trained on the world and only means
something there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import nn

from ccm_sdk.errors import InputError
from ccm_sdk.interfaces import Options
from ccm_sdk.models.small_net import fit, load_net, save_net, split_sizes


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
        return save_net(self, self.config, folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> WorldDepthNet:
        return load_net(cls, DepthNetConfig, folder, what="depth net")


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
    size = len(dataset)
    train_size, holdout = split_sizes(size, holdout, steps, batch_size)
    try:
        net_config = DepthNetConfig(**config)
    except ValidationError as exc:
        raise InputError(f"invalid depth-net config: {exc}") from None
    torch.manual_seed(seed)
    net = WorldDepthNet(net_config)
    result = DepthNetTraining(net)
    result.losses = fit(
        net, _Pairs(dataset, train_size), lambda predicted, depth: (predicted - depth).abs().mean(), steps=steps,
        batch_size=batch_size, lr=lr, seed=seed, num_workers=num_workers, what="depth-net", log=log,
    )  # fmt: skip
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
