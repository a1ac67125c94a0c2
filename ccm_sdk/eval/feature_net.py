"""A small CNN feature network for FID on small synthetic images, and its training as an attribute classifier.

Inception's ImageNet features describe 64-pixel shapes poorly, so domains like the world train
their own: ``train_feature_net`` fits ``SmallFeatureNet`` to predict each sample's multi-hot
attribute vector (``item["labels"]``, e.g. which shapes and colours a scene shows), and FID
uses its penultimate features (as FID uses Inception's pool3 rather than its logits).
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

from ..errors import InputError
from ..interfaces import Options
from ..models.small_net import fit, load_net, save_net, split_sizes

class FeatureNetConfig(Options):
    """Round-trips through config.json."""

    architecture: str = "ccm-small-feature-net"
    num_labels: int = Field(ge=1, description="outputs of the attribute classifier")
    image_size: int = Field(default=64, ge=8, description="inputs are resized to this square size")
    widths: tuple[int, ...] = Field(default=(32, 64, 128, 128), description="channels of each stride-2 stage")
    feature_dim: int = Field(default=128, ge=1, description="dimension of the FID features")
    label_names: tuple[str, ...] = ()


class SmallFeatureNet(nn.Module):
    """conv stages (3x3 conv, BatchNorm, SiLU, stride-2 conv) -> global mean and max -> features -> attribute logits.

    The max pool keeps small objects visible to "is there a ..." attributes, which an average
    over the whole image dilutes. In eval mode (always, outside training) BatchNorm uses its
    running statistics, so an image's features never depend on the rest of its batch.
    """

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = 3
        for width in config.widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, stride=2, padding=1),
                nn.SiLU(),
            ]
            channels = width
        self.body = nn.Sequential(*layers)
        self.features = nn.Linear(2 * channels, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_labels)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> features [B, feature_dim]."""
        size = self.config.image_size
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        hidden = self.body(images * 2 - 1)
        return self.features(torch.cat([hidden.mean(dim=(2, 3)), hidden.amax(dim=(2, 3))], dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Attribute logits [B, num_labels]."""
        return self.head(F.silu(self.embed(images)))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        return save_net(self, self.config, folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> SmallFeatureNet:
        return load_net(cls, FeatureNetConfig, folder, what="feature net")


class FeatureNetExtractor:
    """FID features from a trained ``SmallFeatureNet``."""

    name = "feature-net"

    def __init__(self, net: SmallFeatureNet, *, device: torch.device | str = "cpu"):
        self.net = net.to(device).eval()
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: torch.device | str = "cpu") -> FeatureNetExtractor:
        return cls(SmallFeatureNet.from_pretrained(folder), device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(images.to(self.device, torch.float32)).cpu()


@dataclass
class FeatureNetTraining:
    """What ``train_feature_net`` returns."""

    net: SmallFeatureNet
    losses: list[float] = field(default_factory=list)  # per step
    accuracy: float | None = None  # per-attribute accuracy on the held-out samples


class _Examples(torch.utils.data.Dataset):
    """(image, labels) pairs of ``dataset``'s first ``count`` items."""

    def __init__(self, dataset, count: int, labels_key: str):
        self.dataset, self.count, self.labels_key = dataset, count, labels_key

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        if self.labels_key not in item:
            raise InputError(f"dataset items need a {self.labels_key!r} entry (a multi-hot attribute vector) to train the feature net")
        return torch.as_tensor(item["image"]).float(), torch.as_tensor(item[self.labels_key]).float()


def _stack(dataset, indices, labels_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    examples = _Examples(dataset, len(dataset), labels_key)
    images, labels = zip(*(examples[i] for i in indices))
    return torch.stack(images), torch.stack(labels)


def train_feature_net(
    dataset,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    holdout: int = 256,
    num_workers: int = 0,
    labels_key: str = "labels",
    label_names: tuple[str, ...] = (),
    device: torch.device | str = "cpu",
    output_dir: str | os.PathLike | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    **config: Any,
) -> FeatureNetTraining:
    """Train a ``SmallFeatureNet`` to predict ``item[labels_key]`` from ``item["image"]`` (binary cross-entropy).

    The last ``holdout`` samples of ``dataset`` are held out to report per-attribute accuracy;
    training draws seeded random batches (with replacement) from the rest, loaded by
    ``num_workers`` DataLoader processes. ``config`` sets ``FeatureNetConfig`` fields
    (``image_size``, ``widths``, ``feature_dim``). Saves to ``output_dir`` when given.
    """
    size = len(dataset)
    train_size, holdout = split_sizes(size, holdout, steps, batch_size)
    # 1. the network, sized by the first sample's labels and image
    first_images, first_labels = _stack(dataset, [0], labels_key)
    config.setdefault("image_size", first_images.shape[-1])
    try:
        net_config = FeatureNetConfig(num_labels=first_labels.shape[1], label_names=tuple(label_names), **config)
    except ValidationError as exc:
        raise InputError(f"invalid feature-net config: {exc}") from None
    torch.manual_seed(seed)
    net = SmallFeatureNet(net_config)
    # 2. train
    result = FeatureNetTraining(net)
    result.losses = fit(
        net, _Examples(dataset, train_size, labels_key), F.binary_cross_entropy_with_logits, steps=steps, batch_size=batch_size,
        lr=lr, seed=seed, num_workers=num_workers, device=device, what="feature-net", log=log,
    )  # fmt: skip
    # 3. held-out accuracy
    if holdout:
        with torch.no_grad():
            images, labels = _stack(dataset, range(train_size, size), labels_key)
            predicted = (net(images.to(device)) > 0).float().cpu()
        result.accuracy = float((predicted == labels).float().mean())
    if output_dir is not None:
        net.save_pretrained(output_dir)
    return result
