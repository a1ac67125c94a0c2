"""CM's ControlNet by consistency training: the loss by hand, where gradients go, learning, output."""

from __future__ import annotations

import math

import ccm_kernels
import pytest
import torch
from safetensors.torch import load_file

from ccm_sdk.cli import main
from ccm_sdk.errors import InputError, TrainingError
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.training.config import ConsistencyConfig, dump_config
from ccm_sdk.training.ct import ConsistencyDraws, consistency_pair, grid_timesteps, pair_probabilities, sample_draws
from ccm_sdk.training.ct_controlnet import CTControlNetTrainer


@pytest.fixture()
def trainer(make_config, controlnet_dir):
    # start from a tiny ControlNet whose output convolutions are not zero, so control matters
    trainer = CTControlNetTrainer(make_config("ct_controlnet", controlnet=str(controlnet_dir), consistency__huber_c=0.05))
    trainer.setup()
    return trainer


def _draws(latents, distance):
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    return ConsistencyDraws(n=torch.tensor([0, 37]), noise=noise, w=torch.tensor([7.0, 2.5]), distance=distance)


def _by_hand(trainer, inputs, draws, by_hand):
    grid = by_hand.grid(50)
    emb = by_hand.w_embedding(draws.w)
    controlnet = trainer.unwrapped()

    def f(t):
        x = by_hand.add_noise(inputs.latents, draws.noise, t)
        down, mid = controlnet(x, t, encoder_hidden_states=inputs.embeds, controlnet_cond=inputs.control, return_dict=False)
        eps = trainer.unet(x, t, encoder_hidden_states=inputs.embeds, timestep_cond=emb,
                           down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip
        return by_hand.f(eps, x, t)

    with torch.no_grad():
        return f(grid[draws.n + 1]), f(grid[draws.n])


def test_loss_matches_the_hand_computed_value(trainer, fixed_batches, by_hand):
    _, (inputs,) = fixed_batches(trainer)
    draws = _draws(inputs.latents, "l1")
    high, low = _by_hand(trainer, inputs, draws, by_hand)
    c = 0.05
    expected = {"l1": (high - low).abs().mean(), "l2": (high - low).square().mean(),
                "huber": (((high - low) ** 2 + c * c).sqrt() - c).mean()}  # fmt: skip
    for name, value in expected.items():
        got = trainer.compute_loss(inputs, _draws(inputs.latents, name))
        assert got.item() == pytest.approx(value.item(), rel=1e-4), name
    assert expected["l1"] > 1e-3  # the two points really differ


def test_f_goes_through_the_kernel_op_and_the_target_has_no_gradient(trainer, fixed_batches, monkeypatch):
    _, (inputs,) = fixed_batches(trainer)
    calls = []
    real = ccm_kernels.consistency_step
    monkeypatch.setattr(ccm_kernels, "consistency_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    denoise = trainer.denoiser(trainer.model, inputs, trainer.base.guidance_cond(trainer.unet, torch.full((2,), 7.0)))
    online, target = consistency_pair(denoise, denoise, trainer.base.schedule, inputs.latents, _draws(inputs.latents, "l1"), ConsistencyConfig())
    assert len(calls) == 2
    assert online.requires_grad and not target.requires_grad


def test_lognormal_pairs_follow_improved_ct_and_favour_low_noise(trainer, fixed_batches, make_config, controlnet_dir):
    schedule = trainer.base.schedule
    config = ConsistencyConfig(pair_sampling="lognormal")
    p = pair_probabilities(schedule, config)
    # by hand, improved CT's formula on the 50-point grid 19, 39, ..., 999
    abar = [float(schedule.alphas_cumprod[t]) for t in range(19, 1000, 20)]
    cdf = [math.erf((0.5 * math.log((1 - a) / a) + 1.1) / (math.sqrt(2) * 2.0)) if a > 0 else 1.0 for a in abar]
    expected = torch.tensor([hi - lo for lo, hi in zip(cdf, cdf[1:])], dtype=torch.float64)
    torch.testing.assert_close(p, expected / expected.sum())
    assert len(p) == 49 and p[0] > 4 / 49 and p[-1] < 1 / 49  # the lowest pair 5x as often as uniform, the noisiest rarely
    uniform = pair_probabilities(schedule, ConsistencyConfig())
    assert torch.equal(uniform, torch.full((49,), 1 / 49, dtype=torch.float64))
    with_boundary = pair_probabilities(schedule, ConsistencyConfig(pair_sampling="lognormal", boundary=True))
    assert len(with_boundary) == 50 and with_boundary[0] > p[0]  # t = 0 has sigma 0: the pair (0, 19) gets erf's whole low tail
    # the draws follow p
    torch.manual_seed(0)
    n = sample_draws(torch.zeros(20000, 1), config, schedule).n
    torch.testing.assert_close(torch.bincount(n, minlength=49).double() / 20000, p, atol=0.006, rtol=0)
    # and the trainer draws them: a step runs, and its pairs lean to low noise
    trainer = CTControlNetTrainer(make_config("ct_controlnet", controlnet=str(controlnet_dir), consistency__pair_sampling="lognormal"))
    trainer.setup()
    _, (inputs,) = fixed_batches(trainer)
    torch.manual_seed(1)
    picks = torch.cat([trainer.sample_draws(inputs).n for _ in range(200)])
    assert (picks < 10).float().mean() > 0.35  # uniform: 10/49 = 0.20
    assert torch.isfinite(trainer.compute_loss(inputs, trainer.sample_draws(inputs)))
    with pytest.raises(InputError, match="noise schedule"):
        sample_draws(inputs.latents, config)
    with pytest.raises(InputError, match="no mass"):
        pair_probabilities(schedule, ConsistencyConfig(pair_sampling="lognormal", lognormal_mean=80.0, lognormal_std=0.1))


def test_the_boundary_grid_starts_at_zero_and_its_lowest_target_is_the_noised_data(trainer, fixed_batches, by_hand):
    schedule = trainer.base.schedule
    low, high = grid_timesteps(schedule, 50, torch.tensor([0, 1, 49]), boundary=True)
    assert low.tolist() == [0, 19, 979] and high.tolist() == [19, 39, 999]
    assert grid_timesteps(schedule, 50, torch.tensor([0]))[0].tolist() == [19]  # LCM's grid has no t = 0
    with pytest.raises(Exception, match="0..49"):
        grid_timesteps(schedule, 50, torch.tensor([50]), boundary=True)
    # n ~ U{0..N-1} with the boundary point (N pairs), U{0..N-2} without
    torch.manual_seed(0)
    latents = torch.zeros(4000, 1)
    assert int(sample_draws(latents, ConsistencyConfig(num_points=5, boundary=True)).n.max()) == 4
    assert int(sample_draws(latents, ConsistencyConfig(num_points=5)).n.max()) == 3
    # c_skip(0) = 1, c_out(0) = 0: the target at t = 0 is x_0 itself, whatever the network says
    _, (inputs,) = fixed_batches(trainer)
    draws = _draws(inputs.latents, "l1")
    draws.n = torch.tensor([0, 0])
    denoise = trainer.denoiser(trainer.model, inputs, trainer.base.guidance_cond(trainer.unet, draws.w))
    online, target = consistency_pair(denoise, denoise, schedule, inputs.latents, draws, ConsistencyConfig(boundary=True))
    x_0 = by_hand.add_noise(inputs.latents, draws.noise, torch.tensor([0, 0]))
    torch.testing.assert_close(target, x_0, atol=1e-6, rtol=0)
    _, f_19 = _by_hand(trainer, inputs, draws, by_hand)  # n = 0 there: grid[0] = 19
    torch.testing.assert_close(online.detach(), f_19, atol=1e-5, rtol=1e-4)
    assert (online.detach() - target).abs().mean() > 1e-3  # so the pair (0, 19) has a loss to learn from


def test_an_ema_target_follows_the_controlnet_and_is_what_the_online_side_chases(make_config, controlnet_dir, fixed_batches):
    plain = CTControlNetTrainer(make_config("ct_controlnet", controlnet=str(controlnet_dir)))
    plain.setup()
    trainer = CTControlNetTrainer(make_config("ct_controlnet", controlnet=str(controlnet_dir), target_ema_decay=0.9))
    trainer.setup()
    assert plain.ema is None and trainer.ema is not None
    _, (inputs,) = fixed_batches(trainer)
    draws = _draws(inputs.latents, "l1")
    # a fresh EMA equals psi: the same loss as the method's stopgrad(psi)
    assert trainer.compute_loss(inputs, draws).item() == pytest.approx(plain.compute_loss(inputs, draws).item(), rel=1e-5)
    online = dict(trainer.unwrapped().named_parameters())["controlnet_mid_block.weight"]
    target = dict(trainer.ema.module.named_parameters())["controlnet_mid_block.weight"]
    before = target.detach().clone()
    with torch.no_grad():
        online.add_(1.0)
    trainer.after_optimizer_step()
    torch.testing.assert_close(target, 0.9 * before + 0.1 * online.detach())
    assert not target.requires_grad
    # the moved online weights no longer match the target: the loss differs from stopgrad(psi)'s
    with torch.no_grad():
        plain_online = dict(plain.unwrapped().named_parameters())["controlnet_mid_block.weight"]
        plain_online.add_(1.0)
    assert trainer.compute_loss(inputs, draws).item() != pytest.approx(plain.compute_loss(inputs, draws).item(), rel=1e-3)
    assert set(trainer.extra_weights()["ema"]) == set(trainer.ema.names) and plain.extra_weights() == {}
    with pytest.raises(TrainingError, match="no EMA target weights"):
        trainer.load_extra_weights({})


@pytest.mark.slow
def test_cli_resume_is_exact_with_an_ema_target(make_config, tmp_path):
    common = dict(train__max_steps=4, checkpoint__every=2, target_ema_decay=0.9)
    reference = CTControlNetTrainer(make_config("ct_controlnet", output_dir=str(tmp_path / "reference"), **common)).train()
    config_file = dump_config(make_config("ct_controlnet", output_dir=str(tmp_path / "resumed"), **common), tmp_path / "ct.yaml")
    assert main(["train", "ct_controlnet", "--config", str(config_file), "--max_steps", "2"]) == 0
    assert main(["train", "ct_controlnet", "--config", str(config_file), "--resume"]) == 0
    name = "controlnet/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(str(tmp_path / "resumed" / name)), load_file(str(reference.output_dir / name))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "resumed" / "loss.csv").read_text() == (reference.output_dir / "loss.csv").read_text()


def test_only_the_controlnet_gets_gradients(trainer, fixed_batches, assert_gradients):
    _, (inputs,) = fixed_batches(trainer)
    trainer.compute_loss(inputs, _draws(inputs.latents, "l1")).backward()
    pipe = trainer.base.pipe
    assert_gradients(trainer.unwrapped(), [trainer.unet, pipe.vae, pipe.text_encoder])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.unwrapped().controlnet_down_blocks.parameters())


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_output_loads(make_config, eval_loss, control_image):
    trainer = CTControlNetTrainer(make_config("ct_controlnet", train__max_steps=200, train__lr=2e-3, checkpoint__every=1000))
    trainer.setup()
    evaluate = eval_loss(trainer)
    before = evaluate()
    result = trainer.train()
    after = evaluate()
    assert after < 0.85 * before, (before, after)
    assert [row[0] for row in result.history] == list(range(1, 201))
    # the ControlNet folder plugs into the consistency model as it is
    pipe = CCMPipeline.from_pretrained(trainer.config.model, controlnet=result.outputs["controlnet"])
    pipe.set_progress_bar_config(disable=True)
    trained = pipe.controlnets[0].state_dict()
    assert all(torch.equal(trained[k], v) for k, v in trainer.unwrapped().state_dict().items())
    out = pipe("a red square", control_image[..., :32, :32], num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()
