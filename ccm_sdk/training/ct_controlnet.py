"""CM's ControlNet by consistency training (method doc, section 3.2).

The consistency model's UNet is frozen; only the ControlNet psi trains, with

    d( f_{theta,psi}(x_{t_{n+1}}, t_{n+1}, c, c_ctrl),  f_{theta,psi^-}(x_{t_n}, t_n, c, c_ctrl) ),  psi^- = stopgrad(psi)

(``ct.py``). No diffusion model is needed. A UNet with a guidance embedding gets w as
``timestep_cond``; the ControlNet gets none, as at inference. ``target_ema_decay > 0`` makes psi^-
an exponential moving average of psi instead (consistency models' original CT target).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..models.controlled_unet import Control, controlled_unet
from .config import ConsistencyConfig
from .controls import ControlInputs, ControlNetTrainConfig, ControlNetTrainer
from .ct import ConsistencyDraws, Denoise, consistency_loss, consistency_pair, sample_draws
from .ema import EmaTarget, EmaTargetHooks


class CTControlNetTrainConfig(ControlNetTrainConfig):
    """CM's ControlNet by consistency training on a frozen consistency-model UNet."""

    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    target_ema_decay: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="psi^-: 0 is the method's stopgrad(psi); > 0 an EMA of psi with this decay (the original CT target)",
    )  # fmt: skip


class _Fixed(nn.Module):
    """Stands in for the control-image embedding with a value already computed."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.value


class CTControlNetTrainer(EmaTargetHooks, ControlNetTrainer):
    """Trains a ControlNet for a consistency model with the consistency-training loss."""

    name = "ct_controlnet"
    description = "CM's ControlNet: consistency training on a frozen consistency-model UNet"
    config_class = CTControlNetTrainConfig

    def build(self) -> nn.Module:
        controlnet = super().build()
        decay = self.config.target_ema_decay
        self.ema = EmaTarget(controlnet, decay, self.device) if decay > 0 else None
        return controlnet

    def sample_draws(self, inputs: ControlInputs) -> ConsistencyDraws:
        return sample_draws(inputs.latents, self.config.consistency, self.base.schedule)

    @property
    def validation_sampler(self) -> dict[str, Any]:
        return {"consistency": True, "guidance_scale": self.config.consistency.w + 1.0}

    def denoiser(self, controlnet: nn.Module, inputs: ControlInputs, timestep_cond: torch.Tensor | None) -> Denoise:
        controls = [Control(controlnet, inputs.control)]

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return controlled_unet(self.unet, x, t, inputs.embeds, controls, timestep_cond=timestep_cond)

        return denoise

    def compute_loss(self, inputs: ControlInputs, draws: ConsistencyDraws) -> torch.Tensor:
        cfg = self.config.consistency
        timestep_cond = self.base.guidance_cond(self.unet, draws.w)
        online = self.denoiser(self.model, inputs, timestep_cond)
        hook = None
        if self.ema is not None:
            target = self.denoiser(self.ema.module, inputs, timestep_cond)
        else:
            target, hook = self._stopgrad_target(inputs, timestep_cond)
        try:
            f_online, f_target = consistency_pair(online, target, self.base.schedule, inputs.latents, draws, cfg)
        finally:
            if hook is not None:
                hook.remove()
        return consistency_loss(f_online, f_target, draws, self.base.schedule, cfg)

    def _stopgrad_target(self, inputs: ControlInputs, timestep_cond) -> tuple[Denoise, Any]:
        """psi^- = stopgrad(psi), and the hook to remove once the online pass and the target have run."""
        # the target uses the same weights without DDP's wrapper: it runs without gradients
        target_net = self.unwrapped()
        target_denoise = self.denoiser(target_net, inputs, timestep_cond)
        inner = target_net.controlnet_cond_embedding
        kept: list[torch.Tensor] = []
        hook = inner.register_forward_hook(lambda module, args, output: kept.append(output.detach()))

        def target(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # the control image's embedding depends on neither x nor t: reuse the online pass's
            # (same weights, same values) instead of computing it again
            target_net.controlnet_cond_embedding = _Fixed(kept[-1])
            try:
                return target_denoise(x, t)
            finally:
                target_net.controlnet_cond_embedding = inner

        return target, hook
