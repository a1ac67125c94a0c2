"""Sampler functions against diffusers' scheduler loops, with a deterministic toy model."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler

from ccm_sdk import get_sampler
from ccm_sdk.errors import InputError, UnknownNameError
from ccm_sdk.sampling import sample_consistency, sample_ddim, sample_tcd, sample_with_scheduler
from ccm_sdk.schedule import NoiseSchedule
from ccm_sdk.testing.tiny import lcm_scheduler

CONFIG = dict(lcm_scheduler().config)


def toy_model(x, t, **_):
    """A smooth, deterministic stand-in for a UNet."""
    return 0.7 * x + 0.1 * torch.sin(x * (1 + t / 1000))


def _start(seed=0, shape=(2, 4, 6, 5)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference_loop(scheduler, x, generator, **step_kwargs):
    for t in scheduler.timesteps:
        out = toy_model(scheduler.scale_model_input(x, t), int(t))
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_consistency_matches_lcm_scheduler(steps):
    schedule = NoiseSchedule.from_scheduler_config(CONFIG)
    ref = LCMScheduler.from_config(CONFIG)
    ref.set_timesteps(steps)
    expected = _reference_loop(ref, _start(), torch.Generator().manual_seed(1))
    got = sample_consistency(toy_model, _start(), schedule.lcm_timesteps(steps), schedule=schedule, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_matches_tcd_scheduler(gamma):
    schedule = NoiseSchedule.from_scheduler_config(CONFIG)
    timesteps = schedule.lcm_timesteps(4)
    ref = TCDScheduler.from_config(CONFIG)
    ref.set_timesteps(timesteps=timesteps.tolist())
    x, g = _start(), torch.Generator().manual_seed(2)
    for t in ref.timesteps:
        x = ref.step(toy_model(x, int(t)), t, x, eta=gamma, generator=g).prev_sample
    got = sample_tcd(toy_model, _start(), timesteps, schedule=schedule, gamma=gamma, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(got, x, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_ddim_scheduler(eta):
    schedule = NoiseSchedule.from_scheduler_config(CONFIG)
    ref = DDIMScheduler.from_config(CONFIG)
    ref.set_timesteps(10)
    expected = _reference_loop(ref, _start(), torch.Generator().manual_seed(3), eta=eta)
    timesteps = get_sampler("ddim").timesteps(schedule, 10)
    got = sample_ddim(toy_model, _start(), timesteps, schedule=schedule, eta=eta, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(got, expected, atol=1e-5)


def test_scheduler_sampler_runs_dpm_solver():
    schedule = NoiseSchedule.from_scheduler_config(CONFIG)
    ref = DPMSolverMultistepScheduler.from_config(CONFIG)
    ref.set_timesteps(12)
    expected = _reference_loop(ref, _start() * ref.init_noise_sigma, None)
    sampler = get_sampler("scheduler", scheduler="DPMSolverMultistepScheduler")
    got = sampler.sample(toy_model, _start(), sampler.timesteps(schedule, 12), schedule=schedule)
    assert torch.allclose(got, expected, atol=1e-5)


def test_callback_sees_every_step():
    schedule = NoiseSchedule.from_scheduler_config(CONFIG)
    seen = []
    sample_consistency(toy_model, _start(), schedule.lcm_timesteps(4), schedule=schedule, callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2, 3]
    assert [s["t"] for s in seen] == schedule.lcm_timesteps(4).tolist()
    assert torch.equal(seen[-1]["x"], seen[-1]["denoised"])  # the last step returns f(x, t)


def test_sampler_options_are_validated():
    with pytest.raises(InputError, match="gamma"):
        get_sampler("consistency", gamma=2.0)
    with pytest.raises(InputError, match="Accepted options"):
        get_sampler("ddim", steps=3)
    with pytest.raises(UnknownNameError, match="DPMSolverMultistepScheduler"):
        get_sampler("scheduler", scheduler="NoSuchScheduler")
    with pytest.raises(UnknownNameError, match="available: consistency, ddim, scheduler"):
        get_sampler("euler-ancestral")


def test_scheduler_sampler_refuses_img2img():
    schedule = NoiseSchedule.from_scheduler_config(CONFIG)
    with pytest.raises(InputError, match="img2img"):
        get_sampler("scheduler").timesteps(schedule, 4, strength=0.5)


def test_scheduler_sampler_without_instance_raises():
    schedule = NoiseSchedule.from_scheduler_config(CONFIG)
    with pytest.raises(InputError, match="scheduler instance"):
        sample_with_scheduler(toy_model, _start(), schedule.lcm_timesteps(2), schedule=schedule)
