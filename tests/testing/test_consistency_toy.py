"""The exact consistency-training toy (ccm_sdk.testing.consistency_toy): its ground truth, and the
recommended recipe learning control on it through the SDK's own loss code."""

from __future__ import annotations

import pytest
import torch

from ccm_sdk.testing import consistency_toy
from ccm_sdk.testing.consistency_toy import ConsistencyToy, ControlledModel, GaussianMixture, _ZeroBranch, train_branch
from ccm_sdk.training import ct
from ccm_sdk.training.config import ConsistencyConfig

GRID = [19, 39, 259, 499, 759, 979, 999]


@pytest.fixture(scope="module")
def toy():
    return ConsistencyToy.build()


@pytest.mark.parametrize("t", GRID)
def test_the_ode_solver_is_exact_on_a_single_gaussian(toy, t):
    """One mode: the solver's consistency function against the closed form, from every noise level."""
    single = GaussianMixture(means=torch.tensor([[0.5, -0.3]]), std=0.1)
    k = torch.zeros(500, dtype=torch.long)
    timesteps = torch.full((500,), t)
    torch.manual_seed(0)
    x = toy.schedule.add_noise(single.sample(k), torch.randn(500, 2), timesteps)
    alpha = toy.schedule.alpha(timesteps)
    error = (single.consistency(x, alpha) - single.conditional_consistency(x, alpha, k)).abs().max()
    assert float(error) < 5e-3  # in units where the mode's std is 0.1


def test_the_base_is_the_mixture_consistency_function_through_the_sdk_parameterisation(toy):
    base = toy.base()
    torch.manual_seed(0)
    x, t = torch.randn(64, 2), torch.randint(1, 50, (64,)) * 20 - 1
    f, _ = toy.schedule.consistency(base(x, t), x, t)
    torch.testing.assert_close(f, toy.mixture.consistency(x, toy.schedule.alpha(t)), atol=1e-5, rtol=1e-5)


def test_the_conditional_truth_keeps_its_mode_and_the_unconditional_base_does_not(toy):
    """From pure noise the exact conditional function lands in the asked mode; the base picks by region."""
    torch.manual_seed(0)
    z, k = torch.randn(400, 2), torch.arange(400) % 4
    top = torch.full((400,), 999)
    alpha = toy.schedule.alpha(top)
    assert bool((toy.mixture.nearest_mode(toy.mixture.conditional_consistency(z, alpha, k)) == k).all())
    landed = toy.mixture.nearest_mode(toy.mixture.consistency(z, alpha))
    assert 0.15 < float((landed == k).float().mean()) < 0.35  # chance is 0.25


def test_the_frozen_base_alone_has_no_control_and_no_growth(toy):
    measure = toy.measure(ControlledModel(toy.base(), _ZeroBranch()), samples=800)
    assert 0.15 < measure.accuracy_1 < 0.35 and 0.15 < measure.accuracy_4 < 0.35
    assert measure.low_end_growth == pytest.approx(1.0)


def test_training_goes_through_the_sdk_consistency_loss(toy, monkeypatch):
    calls = []
    real = ct.consistency_loss
    monkeypatch.setattr(ct, "consistency_loss", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    config = ConsistencyConfig(recipe="ccm")
    train_branch(toy, config, steps=3, batch=8)
    assert len(calls) == 3 and all(c is config for c in calls)


def test_the_recommended_recipe_learns_control_on_the_exact_toy(toy):
    """The default consistency-training recipe: at least 90% control at 1 and 4 steps, at most 1.5x the
    base's one-step error at the low-noise end, from a zero-initialised branch on the frozen exact base."""
    torch.set_num_threads(1)  # the toy is tiny: one thread is the fastest and does not fight other work
    model = train_branch(toy, ConsistencyConfig(), steps=2000, batch=64, lr=1e-3, seed=0)
    measure = toy.measure(model)
    assert measure.accuracy_1 >= 0.9, measure
    assert measure.accuracy_4 >= 0.9, measure
    assert measure.low_end_growth <= 1.5, measure
