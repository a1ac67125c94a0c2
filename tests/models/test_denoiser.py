"""ControlledDenoiser: which ControlNets run at each step, and at what scale."""

from __future__ import annotations

import torch

from ccm_sdk.models.denoiser import ControlledDenoiser, ControlSpec
from ccm_sdk.testing import tiny


def test_controls_at_follows_the_guidance_window_and_leaves_out_zero_scales():
    unet = tiny.tiny_unet()
    a, b, c = (tiny.tiny_controlnet(unet, seed=s) for s in (1, 2, 3))
    image = torch.rand(1, 3, 64, 64)
    specs = [ControlSpec(a, image, 0.5, 0.0, 0.5), ControlSpec(b, image, 2.0, 0.25, 1.0), ControlSpec(c, image, 0.0)]
    denoiser = ControlledDenoiser(unet, prompt_embeds=torch.zeros(1, 77, tiny.TEXT_DIM), controls=specs, timesteps=[999, 759, 499, 259])
    runs = {t: [(control.controlnet, control.scale) for control in denoiser.controls_at(t)] for t in (999, 759, 499, 259)}
    assert runs == {999: [(a, 0.5)], 759: [(a, 0.5), (b, 2.0)], 499: [(b, 2.0)], 259: [(b, 2.0)]}
    assert [(control.controlnet, control.scale) for control in denoiser.controls_at(10)] == [(a, 0.5), (b, 2.0)]  # off the schedule: all
