"""DM's ControlNet: the diffusion loss by hand (epsilon and v), gradients, learning, errors."""

from __future__ import annotations

import pytest
import torch

from ccm_sdk.errors import IncompatibleModelsError
from ccm_sdk.training.dm_controlnet import (
    DiffusionDraws,
    DMControlNetTrainer,
    diffusion_target,
)


@pytest.fixture()
def trainer(make_config, sd_controlnet_dir):
    trainer = DMControlNetTrainer(make_config("dm_controlnet", controlnet=str(sd_controlnet_dir)))
    trainer.setup()
    return trainer


def _draws(latents):
    return DiffusionDraws(t=torch.tensor([10, 700]), noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)))


def test_epsilon_loss_matches_the_hand_computed_value(trainer, fixed_batches, by_hand):
    _, (inputs,) = fixed_batches(trainer)
    draws = _draws(inputs.latents)
    with torch.no_grad():
        x = by_hand.add_noise(inputs.latents, draws.noise, draws.t)
        down, mid = trainer.unwrapped()(x, draws.t, encoder_hidden_states=inputs.embeds, controlnet_cond=inputs.control, return_dict=False)
        eps = trainer.unet(x, draws.t, encoder_hidden_states=inputs.embeds,
                           down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip
        expected = (eps - draws.noise).square().mean()
    assert trainer.compute_loss(inputs, draws).item() == pytest.approx(expected.item(), rel=1e-5)


def test_v_prediction_target(by_hand):
    from ccm_sdk.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_scheduler_config({**by_hand.scheduler.config, "prediction_type": "v_prediction"})
    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([5, 900])
    a = by_hand.alphas[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(diffusion_target(schedule, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)
    sample = NoiseSchedule.from_scheduler_config({**by_hand.scheduler.config, "prediction_type": "sample"})
    assert diffusion_target(sample, x0, noise, t) is x0


def test_only_the_controlnet_gets_gradients(trainer, fixed_batches, assert_gradients):
    _, (inputs,) = fixed_batches(trainer)
    trainer.compute_loss(inputs, _draws(inputs.latents)).backward()
    pipe = trainer.base.pipe
    assert_gradients(trainer.unwrapped(), [trainer.unet, pipe.vae, pipe.text_encoder])


def test_a_consistency_model_is_refused(make_config, lcm_dir):
    with pytest.raises(IncompatibleModelsError, match="ct_controlnet"):
        DMControlNetTrainer(make_config("dm_controlnet", model=str(lcm_dir))).setup()


@pytest.mark.slow
def test_training_lowers_the_loss(make_config, eval_loss):
    trainer = DMControlNetTrainer(make_config("dm_controlnet", train__max_steps=150, train__lr=2e-3, checkpoint__every=1000))
    trainer.setup()
    evaluate = eval_loss(trainer)
    before = evaluate()
    trainer.train()
    assert evaluate() < 0.8 * before
