"""An EMA copy of a network's trainable weights, used as the consistency target psi^- / theta^-."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import TrainingError
from .frozen import freeze


class EmaTarget:
    """A frozen copy of ``online`` whose trainable weights follow it: w <- decay w + (1 - decay) w_online."""

    def __init__(self, online: nn.Module, decay: float, device: torch.device | str):
        if not 0.0 < decay < 1.0:
            raise TrainingError(f"expected an EMA decay in (0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, p in online.named_parameters() if p.requires_grad]
        self.module = copy.deepcopy(online)
        freeze(self.module)
        self.module.to(device)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        weights, target = dict(online.named_parameters()), dict(self.module.named_parameters())
        for name in self.names:
            target[name].lerp_(weights[name].detach(), 1.0 - self.decay)

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """For a checkpoint's extra weights."""
        target = dict(self.module.named_parameters())
        return {"ema": {name: target[name] for name in self.names}}

    def load(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        if "ema" not in weights or set(weights["ema"]) != set(self.names):
            raise TrainingError("the checkpoint has no EMA target weights matching this run (was the EMA decay changed?)")
        self.module.load_state_dict(weights["ema"], strict=False)


class EmaTargetHooks:
    """Trainer hooks that keep ``self.ema`` (an :class:`EmaTarget` or None) updated and checkpointed."""

    ema: EmaTarget | None = None

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.unwrapped())

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.ema.state() if self.ema is not None else {}

    def load_extra_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.ema is not None:
            self.ema.load(weights)
