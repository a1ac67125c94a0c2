"""CCM's unified adapter: one residual block per ControlNet output (method doc, section 3.3).

    r' = r + conv2(act(conv1(r)))

conv2 starts at zero, so a fresh adapter is the identity. The block runs through
``ccm_kernels.adapter_residual_block`` (fused epilogues on CUDA, the PyTorch reference elsewhere).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CorruptWeightsError, IncompatibleModelsError, InputError, ShapeError
from ..interfaces import Adapter
from .loading import check_safetensors, read_json, resolve_model_path

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "config.json"


class UnifiedAdapterConfig(BaseModel):
    """Round-trips through config.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter_type: Literal["unified"] = "unified"
    channels: tuple[int, ...] = Field(description="channels of each ControlNet output: down residuals, then mid")
    hidden_ratio: float = Field(default=1.0, gt=0)
    kernel_size: int = Field(default=3, ge=1)
    activation: Literal["silu", "gelu", "relu"] = "silu"


def controlnet_output_channels(controlnet: nn.Module) -> tuple[int, ...]:
    """Channels of a diffusers ControlNet's residual outputs, down blocks first, then mid."""
    down = [conv.out_channels for conv in controlnet.controlnet_down_blocks]
    return (*down, controlnet.controlnet_mid_block.out_channels)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int, kernel_size: int, activation: str):
        super().__init__()
        if kernel_size % 2 == 0:
            raise InputError(f"expected an odd kernel_size, got {kernel_size}")
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size, padding=kernel_size // 2)
        self.activation = activation
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ccm_kernels import adapter_residual_block

        return adapter_residual_block(
            x, self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias, activation=self.activation
        )


class UnifiedAdapter(Adapter):
    """One light residual block per ControlNet output, shared across conditions."""

    name = "unified"

    def __init__(self, config: UnifiedAdapterConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            try:
                config = UnifiedAdapterConfig(**kwargs)
            except ValidationError as exc:
                raise InputError(f"invalid adapter config: {exc}") from None
        self.config = config
        self.blocks = nn.ModuleList(
            ResidualBlock(c, max(1, round(c * config.hidden_ratio)), config.kernel_size, config.activation) for c in config.channels
        )

    @classmethod
    def for_controlnet(cls, controlnet: nn.Module, **kwargs: Any) -> UnifiedAdapter:
        return cls(UnifiedAdapterConfig(channels=controlnet_output_channels(controlnet), **kwargs))

    def check_compatible(self, controlnet: nn.Module) -> None:
        got = controlnet_output_channels(controlnet)
        if got != tuple(self.config.channels):
            raise IncompatibleModelsError(f"adapter expects ControlNet outputs with channels {list(self.config.channels)}, got {list(got)}")

    def forward(self, down_residuals: Sequence[torch.Tensor], mid_residual: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if len(down_residuals) + 1 != len(self.blocks):
            raise ShapeError(f"adapter expects {len(self.blocks) - 1} down residuals, got {len(down_residuals)}")
        outs = [block(r) for block, r in zip(self.blocks, [*down_residuals, mid_residual])]
        return outs[:-1], outs[-1]

    # --- persistence --------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """config.json + adapter.safetensors, each written to a temporary name and renamed."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **self.config.model_dump(mode="json")}
        tmp_config, tmp_weights = path / f".{CONFIG_NAME}.tmp", path / f".{WEIGHTS_NAME}.tmp"
        tmp_config.write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(tmp_weights), metadata={"format": "pt"})
        os.replace(tmp_weights, path / WEIGHTS_NAME)
        os.replace(tmp_config, path / CONFIG_NAME)
        return path

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, local_files_only: bool | None = None) -> UnifiedAdapter:
        path = resolve_model_path(source, local_files_only=local_files_only, what="adapter")
        raw = read_json(path / CONFIG_NAME, what=f"adapter {str(source)!r}")
        raw.pop("_class_name", None)
        try:
            config = UnifiedAdapterConfig(**raw)
        except ValidationError as exc:
            raise CorruptWeightsError(f"adapter {str(source)!r}: invalid config.json: {exc}") from None
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CorruptWeightsError(f"adapter {str(source)!r}: {WEIGHTS_NAME} is missing")
        check_safetensors(weights)
        adapter = cls(config)
        state = load_file(str(weights))
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            raise CorruptWeightsError(
                f"adapter {str(source)!r}: weights do not match config.json at {wrong[:3]} "
                f"(expected {[expected.get(k) for k in wrong[:3]]}, found {[found.get(k) for k in wrong[:3]]})"
            )
        adapter.load_state_dict(state)
        return adapter.eval()


def load_adapter(source: str | os.PathLike, *, local_files_only: bool | None = None) -> Adapter:
    """Load any registered adapter type from a folder or hub id (its config.json names the type)."""
    from ..registry import adapters

    path = resolve_model_path(source, local_files_only=local_files_only, what="adapter")
    raw = read_json(path / CONFIG_NAME, what=f"adapter {str(source)!r}")
    adapter_cls = adapters.get(raw.get("adapter_type", "unified"))
    return adapter_cls.from_pretrained(path, local_files_only=local_files_only)
