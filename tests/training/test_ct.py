"""The consistency-training pair schedule and weighting (ccm_sdk.training.ct), on the world's schedule."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ccm_sdk.testing.consistency_toy import world_schedule
from ccm_sdk.training.config import ConsistencyConfig
from ccm_sdk.training.ct import (
    DATA_TARGET,
    ConsistencyDraws,
    consistency_loss,
    consistency_pair,
    output_scale,
    pair_timesteps,
    pair_weights,
)
from ccm_sdk.training.losses import distance


@pytest.fixture(scope="module")
def schedule():
    return world_schedule()


EVERY = torch.arange(49)  # n of every pair of the 50-point grid 19, 39, ..., 999


def test_the_method_pairs_adjacent_grid_points(schedule):
    low, high = pair_timesteps(schedule, ConsistencyConfig(recipe="ccm"), EVERY)
    assert high.tolist() == [20 * i + 39 for i in range(49)]
    assert low.tolist() == [20 * i + 19 for i in range(49)]


@pytest.mark.parametrize(
    ("above", "data_pairs"),
    [(1000, 0), (999, 1), (500, 25), (40, 48), (0, 49)],  # t_{n+1} = 39 + 20 n >= above
)
def test_data_targets_from_a_timestep_up(schedule, above, data_pairs):
    low, high = pair_timesteps(schedule, ConsistencyConfig(recipe="ccm", data_target_above=above), EVERY)
    data = low == DATA_TARGET
    assert int(data.sum()) == data_pairs
    assert bool((high[data] >= above).all()) and bool((low[~data] == high[~data] - 20).all())


@pytest.mark.parametrize(
    ("ratio", "n", "expected_low"),
    [
        (0.5, 48, 499),  # 999 / 2 = 499.5: the grid point at or below
        (0.5, 0, 19),  # 39 / 2 = 19.5 -> 19
        (0.2, 48, 799),  # 0.8 * 999 = 799.2
        (0.01, 48, 979),  # a tiny ratio never goes above the adjacent point
        (0.9, 10, 19),  # 0.1 * 239 = 23.9 -> 19
        (0.9, 0, DATA_TARGET),  # 0.1 * 39 = 3.9: no grid point below, so the data
        (1.0, 48, DATA_TARGET),
    ],
)
def test_relative_gaps(schedule, ratio, n, expected_low):
    low, _ = pair_timesteps(schedule, ConsistencyConfig(gap_ratio=ratio), torch.tensor([n]))
    assert low.tolist() == [expected_low]


def test_output_scale_is_the_branch_effect_on_f(schedule):
    t = torch.tensor([19, 999])
    scale = output_scale(schedule, t)
    assert 0.12 < float(scale[0]) < 0.16 and float(scale[1]) == pytest.approx(1.0, abs=1e-4)
    # by finite differences through the consistency parameterisation itself
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    f0, _ = schedule.consistency(v, x, t)
    f1, _ = schedule.consistency(v + 1e-2, x, t)
    torch.testing.assert_close((f1 - f0).abs().mean(1) / 1e-2, scale, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("weighting", ["uniform", "output_scale", "ict"])
def test_weights_have_mean_one_over_the_grid(schedule, weighting):
    config = ConsistencyConfig(weighting=weighting)
    low, high = pair_timesteps(schedule, config, EVERY)
    weights = pair_weights(schedule, config, low, high)
    assert weights.shape == (49,) and float(weights.mean()) == pytest.approx(1.0, rel=1e-5)
    if weighting == "uniform":
        assert bool((weights == 1).all())
    else:
        assert float(weights[0]) > float(weights[-1])  # both favour the low-noise pairs


def test_output_scale_weights_by_hand(schedule):
    l1 = ConsistencyConfig(weighting="output_scale")
    l2 = ConsistencyConfig(weighting="output_scale", distance="l2")
    low, high = pair_timesteps(schedule, l1, EVERY)
    raw = 1 / output_scale(schedule, high).double()
    torch.testing.assert_close(pair_weights(schedule, l1, low, high), (raw / raw.mean()).float())
    torch.testing.assert_close(pair_weights(schedule, l2, low, high), (raw**2 / (raw**2).mean()).float())


def test_ict_weights_by_hand_with_the_zero_snr_sigma_continued(schedule):
    config = ConsistencyConfig(weighting="ict", data_target_above=999)
    low, high = pair_timesteps(schedule, config, EVERY)
    alpha = schedule.alpha(torch.arange(1000)).double()
    sigma = ((1 - alpha) / alpha).sqrt()
    assert torch.isinf(sigma[999])  # zero terminal SNR
    top = sigma[979] ** 2 / sigma[959]  # the grid's top ratio, continued
    raw = torch.cat([1 / (sigma[high[:-1]] - sigma[low[:-1]]), 1 / (top - 0.0).reshape(1)])  # the top pair's target: data
    torch.testing.assert_close(pair_weights(schedule, config, low, high), (raw / raw.mean()).float())


def test_bad_pair_schedules_are_refused():
    for bad in ({"gap_ratio": 0.0}, {"gap_ratio": 1.5}, {"data_target_above": -1}, {"data_target_above": 1001},
                {"weighting": "snr"}):  # fmt: skip
        with pytest.raises(ValidationError):
            ConsistencyConfig(**bad)


def _draws(n, shape=(3, 2)):
    torch.manual_seed(0)
    return ConsistencyDraws(n=torch.tensor(n), noise=torch.randn(shape), w=torch.zeros(shape[0]), distance="l2")


def test_a_data_target_is_the_clean_sample_and_the_target_network_is_skipped(schedule):
    latents = torch.randn(3, 2)
    calls = []

    def online(x, t):
        return torch.zeros_like(x)

    def target(x, t):
        calls.append(t.clone())
        return torch.ones_like(x)

    config = ConsistencyConfig(data_target_above=500)
    draws = _draws([0, 30, 48])  # t_{n+1} = 39, 639, 999
    f_online, f_target = consistency_pair(online, target, schedule, latents, draws, config)
    torch.testing.assert_close(f_target[1:], latents[1:])
    expected, _ = schedule.consistency(torch.ones(1, 2), schedule.add_noise(latents[:1], draws.noise[:1], 19), 19)
    torch.testing.assert_close(f_target[:1], expected)
    assert len(calls) == 1
    calls.clear()
    consistency_pair(online, target, schedule, latents, _draws([40, 45, 48]), config)
    assert calls == []  # every pair's target is the data: the target network never runs


def test_weighted_loss_by_hand(schedule):
    config = ConsistencyConfig(weighting="output_scale", distance="l2")
    draws = _draws([0, 24, 48])
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    low, high = pair_timesteps(schedule, config, draws.n)
    expected = ((a - b).square().mean(1) * pair_weights(schedule, config, low, high)).mean()
    torch.testing.assert_close(consistency_loss(a, b, draws, schedule, config), expected)
    torch.testing.assert_close(distance("l2", a, b, reduce=False), (a - b).square().mean(1))
    uniform = ConsistencyConfig(distance="l2")
    torch.testing.assert_close(consistency_loss(a, b, draws, schedule, uniform), distance("l2", a, b))


def test_draw_rows_keep_the_pairing():
    draws = _draws([0, 24, 48])
    part = draws.rows(slice(1, None))
    assert part.n.tolist() == [24, 48] and torch.equal(part.noise, draws.noise[1:]) and part.distance == "l2"
