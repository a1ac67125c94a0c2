"""NoiseSchedule against diffusers' schedulers, and the consistency boundary condition."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from ccm_sdk.errors import InputError, StepCountError
from ccm_sdk.schedule import NoiseSchedule, guidance_embedding
from ccm_sdk.testing.tiny import lcm_scheduler


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_scheduler_config(lcm_scheduler().config)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 50])
@pytest.mark.parametrize("original", [50, 100])
def test_lcm_timesteps_match_lcm_scheduler(schedule, steps, original):
    ref = lcm_scheduler()
    ref.set_timesteps(steps, original_inference_steps=original)
    assert schedule.lcm_timesteps(steps, original_inference_steps=original).tolist() == ref.timesteps.tolist()


def test_lcm_timesteps_with_strength_match(schedule):
    ref = lcm_scheduler()
    ref.set_timesteps(4, strength=0.5)
    assert schedule.lcm_timesteps(4, strength=0.5).tolist() == ref.timesteps.tolist()


def test_skipping_step_grid(schedule):
    grid = schedule.skipping_grid(50)
    assert grid[0] == 19 and grid[-1] == 999 and (grid[1:] - grid[:-1] == 20).all()


@pytest.mark.parametrize("steps", [0, 51])
def test_steps_out_of_range_raise(schedule, steps):
    with pytest.raises(StepCountError, match="expected 1..50 steps"):
        schedule.lcm_timesteps(steps)


def test_scalings_satisfy_boundary_condition(schedule):
    c_skip, c_out = schedule.scalings(torch.tensor([0, 1, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    assert c_skip[2] < 1e-5 and abs(c_out[2] - 1) < 1e-5
    ref = LCMScheduler.from_config(lcm_scheduler().config)
    for t in (1, 259, 999):
        a, b = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        s, o = schedule.scalings(t)
        assert float(s) == pytest.approx(float(a), rel=1e-6) and float(o) == pytest.approx(float(b), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_and_eps_are_consistent_per_sample(prediction_type):
    config = {**lcm_scheduler().config, "prediction_type": prediction_type}
    schedule = NoiseSchedule.from_scheduler_config(config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 7, generator=g), torch.randn(3, 4, 5, 7, generator=g)
    t = torch.tensor([999, 500, 19])
    xt = schedule.add_noise(x0, noise, t)
    a = schedule.alpha(t).reshape(-1, 1, 1, 1)
    target = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction_type]
    assert torch.allclose(schedule.to_x0(target, xt, t), x0, atol=2e-4)
    assert torch.allclose(schedule.to_eps(target, xt, t), noise, atol=2e-3)


def test_consistency_matches_lcm_step(schedule):
    ref = lcm_scheduler()
    ref.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, t_next = ref.timesteps[0], ref.timesteps[1]
    prev, denoised = ref.step(out, t, x, generator=torch.Generator().manual_seed(5), return_dict=False)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    f, x_next = schedule.consistency(out, x, int(t), noise=noise, t_next=int(t_next))
    assert torch.allclose(f, denoised, atol=1e-6) and torch.allclose(x_next, prev, atol=1e-6)


def test_noise_injection_needs_next_timestep(schedule):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(InputError, match="t_next"):
        schedule.consistency(x, x, 500, noise=x)


def test_per_sample_timesteps_must_match_batch(schedule):
    x = torch.zeros(2, 4, 2, 2)
    with pytest.raises(InputError, match="expected 1 or 2 timesteps"):
        schedule.to_x0(x, x, torch.tensor([1, 2, 3]))


def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 2.5, 7.0])
    ours = guidance_embedding(w, 33)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=33)
    assert torch.equal(ours, ref)


def test_thresholding_configs_are_refused():
    with pytest.raises(InputError, match="thresholding"):
        NoiseSchedule.from_scheduler_config({**lcm_scheduler().config, "thresholding": True})
