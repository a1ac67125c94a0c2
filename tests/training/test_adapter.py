"""The unified adapter's CT training: the loss by hand per condition, gradients, learning, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ccm_sdk.errors import ChannelMismatchError
from ccm_sdk.models.adapter import UnifiedAdapter
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.training.adapter import AdapterDraws, AdapterTrainer
from ccm_sdk.training.ct import ConsistencyDraws


@pytest.fixture()
def trainer(make_config):
    trainer = AdapterTrainer(make_config("adapter"))
    trainer.setup()
    with torch.no_grad():  # leave the identity, so the hand computation sees the blocks work
        generator = torch.Generator().manual_seed(4)
        for block in trainer.unwrapped().blocks:
            block.conv2.weight.copy_(torch.randn(block.conv2.weight.shape, generator=generator) * 0.05)
    return trainer


def _draws(latents, k):
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    return AdapterDraws(ConsistencyDraws(n=torch.tensor([3, 45]), noise=noise, w=torch.tensor([7.0, 7.0]), distance="l1"), k)


def test_loss_matches_the_hand_computed_value_for_each_condition(trainer, fixed_batches, by_hand):
    batches, (inputs,) = fixed_batches(trainer)
    adapter = trainer.unwrapped()
    grid = by_hand.grid(50)
    for k in range(2):
        draws = _draws(inputs.latents, k)
        torch.manual_seed(0)
        control = trainer.sources[k].maps(batches[0])
        controlnet = trainer.controlnets[k]

        def f(t):
            x = by_hand.add_noise(inputs.latents, draws.consistency.noise, t)
            down, mid = controlnet(x, t, encoder_hidden_states=inputs.embeds, controlnet_cond=control, return_dict=False)
            adapted = [r + b.conv2(F.silu(b.conv1(r))) for b, r in zip(adapter.blocks, [*down, mid])]
            eps = trainer.unet(x, t, encoder_hidden_states=inputs.embeds, timestep_cond=by_hand.w_embedding(draws.consistency.w),
                               down_block_additional_residuals=adapted[:-1], mid_block_additional_residual=adapted[-1]).sample  # fmt: skip
            return by_hand.f(eps, x, t)

        with torch.no_grad():
            expected = (f(grid[draws.consistency.n + 1]) - f(grid[draws.consistency.n])).abs().mean()
        torch.manual_seed(0)
        assert trainer.compute_loss(inputs, draws).item() == pytest.approx(expected.item(), rel=1e-4), k


def test_conditions_are_drawn_uniformly(trainer, fixed_batches):
    _, (inputs,) = fixed_batches(trainer)
    torch.manual_seed(0)
    picks = [trainer.sample_draws(inputs).k for _ in range(40)]
    assert set(picks) == {0, 1} and 10 < sum(picks) < 30


def test_only_the_adapter_gets_gradients(trainer, fixed_batches, assert_gradients):
    _, (inputs,) = fixed_batches(trainer)
    trainer.compute_loss(inputs, _draws(inputs.latents, 1)).backward()
    pipe = trainer.base.pipe
    assert_gradients(trainer.unwrapped(), [trainer.unet, pipe.vae, pipe.text_encoder, *trainer.controlnets])


def test_a_controlnet_with_the_wrong_channels_is_refused(make_config, sd_controlnet_dir):
    config = make_config("adapter", controlnets=[{"path": str(sd_controlnet_dir), "condition": "mask"}])
    with pytest.raises(ChannelMismatchError, match=r"controlnets\[0\].*takes 3 conditioning channels.*'mask' makes 4"):
        AdapterTrainer(config).setup()


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_adapter_loads_into_the_pipeline(make_config, eval_loss, sd_controlnet_dir, control_image):
    trainer = AdapterTrainer(make_config("adapter", train__max_steps=150, train__lr=2e-3, checkpoint__every=1000))
    trainer.setup()
    evaluate = eval_loss(trainer)
    before = evaluate()
    result = trainer.train()
    assert evaluate() < 0.85 * before
    folder = result.outputs["adapter"]
    loaded = UnifiedAdapter.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trainer.unwrapped().state_dict().values()))
    pipe = CCMPipeline.from_pretrained(trainer.config.model, controlnet=sd_controlnet_dir, adapter=folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red square", control_image[..., :32, :32], num_inference_steps=2, output_type="pt")
    assert isinstance(pipe.adapter, UnifiedAdapter) and torch.isfinite(out.images).all()
