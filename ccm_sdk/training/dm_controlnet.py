"""DM's ControlNet: the usual diffusion loss on a frozen diffusion UNet (method doc, section 3.1).

    loss = E || target - model(x_t, t, c, c_ctrl) ||^2,   t ~ U{0..T-1}

with target = eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or x0, per the scheduler's
``prediction_type``. Only the ControlNet trains; the UNet, VAE and text encoder are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import IncompatibleModelsError
from ..models.controlled_unet import Control, controlled_unet
from ..pipeline import CCMPipeline
from ..schedule import NoiseSchedule
from .controls import ControlInputs, ControlNetTrainConfig, ControlNetTrainer
from .losses import l2


class DMControlNetTrainConfig(ControlNetTrainConfig):
    """DM's ControlNet: the epsilon (or v) diffusion loss on a frozen diffusion UNet."""


@dataclass
class DiffusionDraws:
    t: torch.Tensor  # [B] long
    noise: torch.Tensor


def diffusion_target(schedule: NoiseSchedule, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network should output at (x_t, t) for the schedule's prediction type."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "sample":
        return latents
    alpha = schedule.alpha(t).to(latents.device, latents.dtype).reshape(-1, *([1] * (latents.ndim - 1)))
    return alpha.sqrt() * noise - (1 - alpha).sqrt() * latents


class DMControlNetTrainer(ControlNetTrainer):
    """Trains a ControlNet for a diffusion model with the epsilon (or v / x0) loss."""

    name = "dm_controlnet"
    description = "DM's ControlNet: the diffusion loss on a frozen diffusion UNet"
    config_class = DMControlNetTrainConfig

    def check_base(self, pipe: CCMPipeline) -> None:
        if pipe.is_lcm:
            raise IncompatibleModelsError(
                f"dm_controlnet trains on a diffusion model, but {self.config.model!r} is a consistency model "
                "(its UNet takes a guidance embedding); use the ct_controlnet trainer for it"
            )

    def sample_draws(self, inputs: ControlInputs) -> DiffusionDraws:
        batch = inputs.latents.shape[0]
        t = torch.randint(0, self.base.schedule.num_train_timesteps, (batch,))
        return DiffusionDraws(t=t, noise=torch.randn_like(inputs.latents))

    def compute_loss(self, inputs: ControlInputs, draws: DiffusionDraws) -> torch.Tensor:
        schedule = self.base.schedule
        x_t = schedule.add_noise(inputs.latents, draws.noise, draws.t)
        t = draws.t.to(self.device)
        prediction = controlled_unet(self.unet, x_t, t, inputs.embeds, [Control(self.model, inputs.control)])
        return l2(prediction, diffusion_target(schedule, inputs.latents, draws.noise, draws.t))
