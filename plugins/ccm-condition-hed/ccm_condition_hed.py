"""HED soft edges for ccm-sdk: the holistically-nested edge network of ControlNet's HED annotator.

The network is the Apache-2.0 HED that ControlNet 1.1 ships (``ControlNetHED_Apache2``): five
VGG-style blocks of 3x3 convolutions, each with a 1x1 side output; the side outputs are upsampled
to the input size, averaged and passed through a sigmoid. It takes RGB in 0..255.

Weights: a ``.safetensors`` file or a torch state dict (read with ``weights_only=True``) with the
annotator's key names (``norm``, ``block1.convs.0.weight``, ..., ``block5.projection.bias``), from a
file, a folder, or a hub repo (default: ``ControlNetHED.pth`` in ``lllyasviel/Annotators``).
Block widths are read from the weights, so narrow test networks load through the same code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_file

import ccm_sdk
from ccm_sdk.conditions.weights import load_state_dict, resolve_weights_file
from ccm_sdk.errors import IncompatibleModelsError
from ccm_sdk.interfaces import Condition, ConditionOptions

DEFAULT_REPO = "lllyasviel/Annotators"
WEIGHT_FILES = ("model.safetensors", "ControlNetHED.pth")
FULL_WIDTHS = (64, 128, 256, 512, 512)
LAYERS = (2, 2, 3, 3, 3)  # 3x3 convolutions per block, as in VGG-16
MIN_SIDE = 16


class DoubleConvBlock(torch.nn.Module):
    """3x3 conv + ReLU layers, optionally after a 2x2 max-pool, with a 1-channel side output."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int):
        super().__init__()
        self.convs = torch.nn.Sequential(
            *(
                torch.nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)
                for i in range(num_layers)
            )
        )
        self.projection = torch.nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor, downsample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if downsample:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNetwork(torch.nn.Module):
    """ControlNet's Apache-2.0 HED: RGB in 0..255 -> five side-output logits at 1, 1/2, ..., 1/16 scale."""

    def __init__(self, widths: tuple[int, ...] = FULL_WIDTHS):
        super().__init__()
        if len(widths) != len(LAYERS):
            raise IncompatibleModelsError(f"HED has {len(LAYERS)} blocks, got widths {tuple(widths)}")
        self.widths = tuple(int(w) for w in widths)
        self.norm = torch.nn.Parameter(torch.zeros(1, 3, 1, 1))  # per-channel mean subtracted from the input
        inputs = (3, *self.widths[:-1])
        for index, (cin, cout, layers) in enumerate(zip(inputs, self.widths, LAYERS, strict=True), start=1):
            self.add_module(f"block{index}", DoubleConvBlock(cin, cout, layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for index in range(1, len(LAYERS) + 1):
            h, side = getattr(self, f"block{index}")(h, downsample=index > 1)
            sides.append(side)
        return sides

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> HEDNetwork:
        """Build a network of the widths the weights imply and load them; other layouts are an error."""
        try:
            widths = tuple(int(state[f"block{i}.convs.0.weight"].shape[0]) for i in range(1, len(LAYERS) + 1))
        except KeyError as exc:
            raise IncompatibleModelsError(
                f"not HED weights: no {exc.args[0]!r} key (first keys: {sorted(state)[:4]})"
            ) from None
        network = cls(widths)
        expected = network.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise IncompatibleModelsError(
                f"weights do not fit HED with widths {widths}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
            )
        network.load_state_dict({k: v.float() for k, v in state.items()})
        return network.eval()


def load_hed(
    source: str | os.PathLike = DEFAULT_REPO, *, filename: str | None = None, local_files_only: bool = False
) -> HEDNetwork:
    """Load HED from a weights file, a folder, or a hub repo id."""
    names = (filename,) if filename else WEIGHT_FILES
    path = resolve_weights_file(source, names, local_files_only=local_files_only, what="HED")
    return HEDNetwork.from_state_dict(load_state_dict(path))


def save_hed(network: HEDNetwork, folder: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` into ``folder`` (created if needed); ``load_hed(folder)`` reads it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}, str(path))
    return path


def build_tiny_hed(folder: str | os.PathLike, *, widths: tuple[int, ...] = (4, 8, 8, 16, 16), seed: int = 0) -> Path:
    """Save a randomly initialised narrow HED (the real architecture) for tests; returns the folder."""
    generator = torch.Generator().manual_seed(seed)
    network = HEDNetwork(widths)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name == "norm":
                param.copy_(torch.tensor([123.7, 116.3, 103.5]).view(1, 3, 1, 1))  # ImageNet mean in 0..255
            elif name.endswith("weight"):
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            else:
                param.zero_()
        # scale the input layer for 0..255 input so activations stay in a range where edges vary
        network.block1.convs[0].weight.div_(64.0)
    save_hed(network, folder)
    return Path(folder)


def safe_step(edges: torch.Tensor, steps: int = 2) -> torch.Tensor:
    """Quantise soft edges to multiples of 1 / ``steps``, as ControlNet's "safe" soft-edge mode does."""
    return torch.floor(edges * (steps + 1)) / steps


class HEDOptions(ConditionOptions):
    model: str = Field(default=DEFAULT_REPO, description="weights file, folder, or hub repo id")
    filename: str | None = Field(
        default=None,
        description="weights file name in a folder or repo (default: model.safetensors, then ControlNetHED.pth)",
    )
    local_files_only: bool = Field(default=False, description="never download; read the hub cache only")
    safe: bool = Field(default=False, description="quantise edges to 0, 0.5 and 1 (ControlNet's safe soft-edge mode)")


class HEDCondition(Condition):
    """Soft HED edges, white on black, 3 channels; h(y) is the same network."""

    name = "hed"
    channels = 3
    Options = HEDOptions
    description = "HED soft edges (ControlNet's Apache-2.0 HED network)"
    weights = DEFAULT_REPO

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self.network = load_hed(o.model, filename=o.filename, local_files_only=o.local_files_only)

    def to(self, device: torch.device | str) -> HEDCondition:
        self.network.to(device)
        return self

    def preprocess(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        device = self.network.norm.device
        size = tuple(images.shape[-2:])
        x = images.to(device)
        if min(size) < MIN_SIDE:  # four 2x2 poolings need 16 px; enlarge smaller images first
            scale = MIN_SIDE / min(size)
            x = F.interpolate(
                x, size=(round(size[0] * scale), round(size[1] * scale)), mode="bilinear", align_corners=False
            )
        sides = self.network(x * 255.0)
        logits = torch.stack([F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sides])
        edges = torch.sigmoid(logits.mean(dim=0))
        if self.options.safe:
            edges = safe_step(edges).clamp(0, 1)
        return edges.expand(-1, 3, -1, -1).contiguous()


@ccm_sdk.hookimpl
def register_conditions(register):
    register(HEDCondition)
