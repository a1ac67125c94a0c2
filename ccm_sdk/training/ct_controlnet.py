"""CM's ControlNet by consistency training (method doc, section 3.2).

The consistency model's UNet is frozen; only the ControlNet psi trains, with

    d( f_{theta,psi}(x_{t_{n+1}}, t_{n+1}, c, c_ctrl),  f_{theta,psi^-}(x_{t_n}, t_n, c, c_ctrl) ),  psi^- = stopgrad(psi)

(``ct.py``). No diffusion model is needed. A UNet with a guidance embedding gets w as
``timestep_cond``; the ControlNet gets none, as at inference.
"""

from __future__ import annotations

import torch

from .config import CTControlNetTrainConfig
from .controls import ControlInputs, ControlNetTrainer, controlnet_residuals
from .ct import ConsistencyDraws, Denoise, consistency_pair, sample_draws
from .losses import distance


class CTControlNetTrainer(ControlNetTrainer):
    """Trains a ControlNet for a consistency model with the consistency-training loss."""

    name = "ct_controlnet"
    config_class = CTControlNetTrainConfig

    def sample_draws(self, inputs: ControlInputs) -> ConsistencyDraws:
        return sample_draws(inputs.latents, self.config.consistency)

    def denoiser(self, controlnet: torch.nn.Module, inputs: ControlInputs, timestep_cond: torch.Tensor | None) -> Denoise:
        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            down, mid = controlnet_residuals(controlnet, x, t, inputs.embeds, inputs.control)
            return self.unet(
                x, t, encoder_hidden_states=inputs.embeds, timestep_cond=timestep_cond,
                down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
            )[0]  # fmt: skip

        return denoise

    def compute_loss(self, inputs: ControlInputs, draws: ConsistencyDraws) -> torch.Tensor:
        cfg = self.config.consistency
        timestep_cond = self.base.guidance_cond(self.unet, draws.w)
        online = self.denoiser(self.model, inputs, timestep_cond)
        # the target uses the same weights without DDP's wrapper: it runs without gradients
        target = self.denoiser(self.unwrapped(), inputs, timestep_cond)
        f_online, f_target = consistency_pair(online, target, self.base.schedule, inputs.latents, draws, num_points=cfg.num_points)
        return distance(draws.distance, f_online, f_target, huber_c=cfg.huber_c)
