"""Small estimators of a control map from a world image, so that Fidelity ||h(y) - c||_1 can be
measured for the conditions that no rule reads back from pixels.

Depth (layer order: background 0, object k of n at (k + 1) / n) and pose (each stick figure's
OpenPose skeleton, drawn in its limb colours) are known exactly for rendered scenes but not
recoverable from an image by a rule. ``train_map_net`` fits :class:`WorldMapNet`, a small
encoder-decoder with skip connections, to predict one such map (``target``) of rendered scenes
from their images (a weighted L1 loss, seeded batches, a held-out error); the ``world-depth``
and ``world-pose`` conditions run the shipped ones as h. Like the world's feature net, they are
trained on the world and only mean something there.
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


class MapNetConfig(Options):
    """Round-trips through config.json."""

    architecture: str = "ccm-world-map-net"
    target: str = Field(default="depth", description="the control map it predicts (the dataset's controls key)")
    channels: int = Field(default=1, ge=1, description="channels predicted: the target map's first ones (depth 1, pose 3)")
    widths: tuple[int, ...] = Field(default=(32, 64, 128), min_length=1, description="channels per level; each level halves the size")
    groups: int = Field(default=8, ge=1, description="GroupNorm groups (an image's map never depends on its batch)")


def _block(channels_in: int, channels_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.GroupNorm(groups, channels_out), nn.SiLU(),
        nn.Conv2d(channels_out, channels_out, 3, padding=1), nn.GroupNorm(groups, channels_out), nn.SiLU(),
    )  # fmt: skip


class WorldMapNet(nn.Module):
    """U-Net-like: conv blocks down (stride-2 convs), nearest upsampling with skip concatenation back up, a sigmoid map."""

    def __init__(self, config: MapNetConfig):
        super().__init__()
        self.config = config
        widths, groups = config.widths, config.groups
        if any(w % groups for w in widths):
            raise InputError(f"map-net widths {list(widths)} must be divisible by groups {groups}")
        self.stem = _block(3, widths[0], groups)
        self.downs = nn.ModuleList(nn.Conv2d(widths[i], widths[i], 3, stride=2, padding=1) for i in range(len(widths) - 1))
        self.encoders = nn.ModuleList(_block(widths[i], widths[i + 1], groups) for i in range(len(widths) - 1))
        self.decoders = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i], groups) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], config.channels, 1)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.config.widths) - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (H, W multiples of ``factor``) -> the map [B, channels, H, W] in [0, 1]."""
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
    def from_pretrained(cls, folder: str | os.PathLike, *, what: str = "map net") -> WorldMapNet:
        return load_net(cls, MapNetConfig, folder, what=what)


@dataclass
class MapNetTraining:
    """What ``train_map_net`` returns."""

    net: WorldMapNet
    losses: list[float] = field(default_factory=list)  # per step
    holdout_l1: float | None = None  # mean |predicted - true map| on the held-out scenes


class _Pairs(torch.utils.data.Dataset):
    """(image, map) of ``dataset``'s first ``count`` items: the first ``channels`` channels of ``controls[target]``."""

    def __init__(self, dataset, count: int, target: str, channels: int):
        self.dataset, self.count, self.target, self.channels = dataset, count, target, channels

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        controls = item.get("controls") or {}
        if self.target not in controls:
            raise InputError(f"dataset items need controls[{self.target!r}] (the ground-truth map) to train the {self.target} net")
        target = torch.as_tensor(controls[self.target]).float()
        if target.shape[0] < self.channels:
            raise InputError(f"controls[{self.target!r}] has {target.shape[0]} channels; the net predicts {self.channels}")
        return torch.as_tensor(item["image"]).float(), target[: self.channels]


def weighted_l1(predicted: torch.Tensor, target: torch.Tensor, foreground_weight: float = 0.0) -> torch.Tensor:
    """Mean |predicted - target|, each pixel weighted 1 + foreground_weight where the target is not black.

    Thin maps (a skeleton covers ~2% of a pose map) would otherwise be learnt as all black.
    """
    error = (predicted - target).abs()
    if not foreground_weight:
        return error.mean()
    weights = 1.0 + foreground_weight * (target.amax(dim=1, keepdim=True) > 0).to(error.dtype)
    return (error * weights).sum() / (weights.sum() * error.shape[1])


def train_map_net(
    dataset,
    *,
    target: str = "depth",
    channels: int = 1,
    foreground_weight: float = 0.0,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    holdout: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    output_dir: str | os.PathLike | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    **config: Any,
) -> MapNetTraining:
    """Train a :class:`WorldMapNet` on ``(item["image"], item["controls"][target][:channels])``.

    The loss is :func:`weighted_l1`. The last ``holdout`` items are held out for the reported
    (unweighted) error; training draws seeded random batches (with replacement) from the rest,
    under a cosine learning-rate decay. ``config`` sets the other ``MapNetConfig`` fields. Saves
    to ``output_dir`` when given.
    """
    size = len(dataset)
    train_size, holdout = split_sizes(size, holdout, steps, batch_size)
    if foreground_weight < 0:
        raise InputError(f"foreground_weight must be >= 0, got {foreground_weight}")
    try:
        net_config = MapNetConfig(target=target, channels=channels, **config)
    except ValidationError as exc:
        raise InputError(f"invalid map-net config: {exc}") from None
    torch.manual_seed(seed)
    net = WorldMapNet(net_config)
    result = MapNetTraining(net)
    result.losses = fit(
        net, _Pairs(dataset, train_size, target, channels), lambda p, t: weighted_l1(p, t, foreground_weight), steps=steps,
        batch_size=batch_size, lr=lr, seed=seed, num_workers=num_workers, device=device, what=f"{target}-net", log=log,
    )  # fmt: skip
    if holdout:
        pairs = _Pairs(dataset, size, target, channels)
        errors = []
        with torch.no_grad():
            for start in range(train_size, size, batch_size):
                images, maps = zip(*(pairs[i] for i in range(start, min(start + batch_size, size))))
                errors.append((net(torch.stack(images).to(device)).cpu() - torch.stack(maps)).abs().flatten(1).mean(1))
        result.holdout_l1 = float(torch.cat(errors).mean())
    if output_dir is not None:
        net.save_pretrained(output_dir)
    return result
