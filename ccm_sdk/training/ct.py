"""The consistency-training (CT) objective (method doc, section 3.2), shared by three trainers.

    n ~ U{0..N-2} on the skipping-step grid t_0 < ... < t_{N-1} (or improved CT's lognormal); one noise z
    (with ``boundary``: t = 0 prepended and n ~ U{0..N-1}, so the lowest target is x_0 itself)
    x_{t_{n+1}} = sqrt(abar_{n+1}) x0 + sqrt(1 - abar_{n+1}) z,   x_{t_n} likewise with the same z
    loss = lambda(n) d( f(x_{t_{n+1}}, t_{n+1}),  stopgrad f(x_{t_n}, t_n) )

The pair schedule says where each pair's low end lies: the adjacent grid point (the method); the
grid point at or below (1 - r) t_{n+1} (``gap_ratio`` r: a gap relative to t, so that a chain of
bootstrapped targets from t = 999 down to the data has about log(T) / -log(1 - r) links instead of
N - 1); or the data itself (``data_target_above``, and wherever a relative gap reaches below the
grid: the target is x_0, CT's coarsest discretisation, marked by t_n = DATA_TARGET). lambda(n) is
the ``weighting`` (uniform, the branch's output scale, or improved CT's 1 / (sigma_{n+1} - sigma_n)).
Named recipes (``ConsistencyConfig.recipe``) fill these in: 'ccm' is the method as the paper
states it, 'relative-gap' the one that learns control on the exact toy (docs/training.md).

f goes through ``NoiseSchedule.consistency`` (the ``consistency_step`` kernel op) on both sides;
the target side runs under ``torch.no_grad`` with the same weights (psi^- = stopgrad(psi)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..schedule import NoiseSchedule
from .config import ConsistencyConfig
from .losses import distance, pick_distance

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t [B]) -> raw model output
DATA_TARGET = -1  # a pair's low end at the data: its target is x_0 itself


@dataclass
class ConsistencyDraws:
    """The random choices of one CT step (tests fix them to check the loss by hand)."""

    n: torch.Tensor  # [B] long: index of the lower grid point
    noise: torch.Tensor  # like the latents
    w: torch.Tensor  # [B] guidance w for the w-embedding
    distance: str  # a concrete distance (a 'random' config picks one per step)

    def rows(self, rows: slice) -> ConsistencyDraws:
        """The draws of some samples of the batch."""
        return ConsistencyDraws(n=self.n[rows], noise=self.noise[rows], w=self.w[rows], distance=self.distance)


def sample_draws(latents: torch.Tensor, config: ConsistencyConfig, schedule: NoiseSchedule | None = None) -> ConsistencyDraws:
    """Draw n, z, w and the distance from the (checkpointed) global RNG (``schedule``: for lognormal pairs)."""
    batch = latents.shape[0]
    if config.pair_sampling == "lognormal":
        if schedule is None:
            raise InputError("lognormal pair sampling needs the noise schedule (its sigmas weight the pairs)")
        n = torch.multinomial(pair_probabilities(schedule, config), batch, replacement=True)
    else:
        n = torch.randint(0, config.num_points if config.boundary else config.num_points - 1, (batch,))
    noise = torch.randn_like(latents)
    if config.w_range is not None:
        low, high = config.w_range
        w = low + (high - low) * torch.rand(batch)
    else:
        w = torch.full((batch,), float(config.w))
    return ConsistencyDraws(n=n, noise=noise, w=w, distance=pick_distance(config.distance))


def _grid(schedule: NoiseSchedule, num_points: int, boundary: bool) -> torch.Tensor:
    """The skipping-step grid as a long tensor, after a leading t = 0 with ``boundary``."""
    grid = torch.from_numpy(schedule.skipping_grid(num_points))
    return torch.cat([grid.new_zeros(1), grid]) if boundary else grid


def pair_probabilities(schedule: NoiseSchedule, config: ConsistencyConfig) -> torch.Tensor:
    """p(n) of each grid pair (t_n, t_{n+1}); 'lognormal' follows improved consistency training
    (Song & Dhariwal 2023): erf((log sigma_{n+1} - P_mean) / (sqrt(2) P_std)) - erf(... sigma_n ...),
    normalised, with sigma = sqrt((1 - abar) / abar) (0 at t = 0, infinite where abar is 0)."""
    grid = _grid(schedule, config.num_points, config.boundary)
    pairs = len(grid) - 1
    if config.pair_sampling == "uniform":
        return torch.full((pairs,), 1.0 / pairs, dtype=torch.float64)
    alpha = schedule.alpha(grid).double()
    alpha = torch.where(grid == 0, torch.ones_like(alpha), alpha)  # t = 0 is the data itself: sigma 0
    log_sigma = (0.5 * ((1 - alpha).log() - alpha.log()))  # -inf at sigma 0, +inf at abar 0: erf takes both
    cdf = torch.erf((log_sigma - config.lognormal_mean) / (math.sqrt(2.0) * config.lognormal_std))
    weights = (cdf[1:] - cdf[:-1]).clamp(min=0.0)
    if not float(weights.sum()) > 0.0:
        raise InputError(f"lognormal pair sampling (mean {config.lognormal_mean}, std {config.lognormal_std}) puts no mass on the grid")
    return weights / weights.sum()


def grid_timesteps(schedule: NoiseSchedule, num_points: int, n: torch.Tensor, *, boundary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_n, t_{n+1}) on the skipping-step grid (after a leading t = 0 with ``boundary``), as long tensors [B]."""
    grid = _grid(schedule, num_points, boundary)
    if int(n.max()) + 1 >= len(grid) or int(n.min()) < 0:
        raise InputError(f"grid index n must lie in 0..{len(grid) - 2}, got {n.tolist()}")
    return grid[n.cpu()], grid[n.cpu() + 1]


def pair_timesteps(schedule: NoiseSchedule, config: ConsistencyConfig, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_low, t_high) of each drawn pair under the config's pair schedule; t_low is DATA_TARGET where the
    target is the data itself."""
    t_low, t_high = grid_timesteps(schedule, config.num_points, n, boundary=config.boundary)
    if config.gap_ratio is not None:
        grid = _grid(schedule, config.num_points, config.boundary)
        below = torch.searchsorted(grid, ((1 - config.gap_ratio) * t_high).floor().long(), right=True) - 1
        below = torch.minimum(below, n)  # never above the adjacent point
        t_low = torch.where(below >= 0, grid[below.clamp(min=0)], torch.full_like(t_low, DATA_TARGET))
    return torch.where(t_high >= config.data_target_above, torch.full_like(t_low, DATA_TARGET), t_low), t_high


def output_scale(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """|d f(x, t) / d model_output| per timestep: how strongly a change of the network's output moves f
    (c_out sqrt(1 - abar) for v-prediction; 0.14 at t = 19 against 1.0 at t = 999 on the world's schedule)."""
    _, c_out = schedule.scalings(t)
    alpha = schedule.alpha(t).float()
    if schedule.prediction_type == "v_prediction":
        return c_out * (1 - alpha).sqrt()
    if schedule.prediction_type == "epsilon":
        return c_out * ((1 - alpha) / alpha).sqrt()
    return c_out


def _sigma(schedule: NoiseSchedule, config: ConsistencyConfig, t: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - abar) / abar) per timestep, 0 at DATA_TARGET. Where abar is 0 (zero terminal SNR)
    sigma is infinite; it continues the grid's top ratio instead: sigma_{N-1}^2 / sigma_{N-2}."""
    grid = _grid(schedule, config.num_points, config.boundary)
    alpha = schedule.alpha(grid).double()
    sigmas = ((1 - alpha) / alpha).sqrt()
    finite = sigmas[torch.isfinite(sigmas)]
    if len(finite) >= 2:
        sigmas = torch.where(torch.isfinite(sigmas), sigmas, finite[-1] ** 2 / finite[-2])
    index = torch.searchsorted(grid, t.clamp(min=0))
    return torch.where(t == DATA_TARGET, torch.zeros_like(sigmas[index]), sigmas[index])


def _raw_weights(schedule: NoiseSchedule, config: ConsistencyConfig, t_low: torch.Tensor, t_high: torch.Tensor) -> torch.Tensor:
    if config.weighting == "output_scale":
        power = 2 if config.distance == "l2" else 1
        return output_scale(schedule, t_high).double().pow(-power)
    if config.weighting == "ict":
        return 1.0 / (_sigma(schedule, config, t_high) - _sigma(schedule, config, t_low))
    return torch.ones(t_high.shape, dtype=torch.float64)


def pair_weights(schedule: NoiseSchedule, config: ConsistencyConfig, t_low: torch.Tensor, t_high: torch.Tensor) -> torch.Tensor:
    """lambda per pair ([B] float32), normalised to mean 1 over every pair of the grid."""
    every = torch.arange(len(_grid(schedule, config.num_points, config.boundary)) - 1)
    grid_low, grid_high = pair_timesteps(schedule, config, every)
    norm = _raw_weights(schedule, config, grid_low, grid_high).mean()
    return (_raw_weights(schedule, config, t_low.cpu(), t_high.cpu()) / norm).float()


def consistency_pair(
    online: Denoise,
    target: Denoise,
    schedule: NoiseSchedule,
    latents: torch.Tensor,
    draws: ConsistencyDraws,
    config: ConsistencyConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x_{t_{n+1}}, t_{n+1}) with gradients, f(x_{t_n}, t_n) without), both float32. Where t_n is
    DATA_TARGET the target is x_0 itself; ``target`` runs only when some pair has its low end on the grid."""
    t_low, t_high = pair_timesteps(schedule, config, draws.n)
    device = latents.device
    x_high = schedule.add_noise(latents, draws.noise, t_high)
    f_high, _ = schedule.consistency(online(x_high, t_high.to(device)).float(), x_high.float(), t_high)
    data = t_low == DATA_TARGET
    if bool(data.all()):
        return f_high, latents.float()
    # the target side runs on the whole batch (its conditioning is batched); data rows are replaced after
    t_low = torch.where(data, t_high, t_low)
    x_low = schedule.add_noise(latents, draws.noise, t_low)
    with torch.no_grad():
        f_low, _ = schedule.consistency(target(x_low, t_low.to(device)).float(), x_low.float(), t_low)
    if bool(data.any()):
        f_low = torch.where(_rows(data, f_low), latents.float(), f_low)
    return f_high, f_low


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def consistency_loss(f_online: torch.Tensor, f_target: torch.Tensor, draws: ConsistencyDraws, schedule: NoiseSchedule,
                     config: ConsistencyConfig) -> torch.Tensor:  # fmt: skip
    """lambda(n) d(f_online, f_target), averaged over the batch (d averaged over each sample's elements)."""
    if config.weighting == "uniform":
        return distance(draws.distance, f_online, f_target, huber_c=config.huber_c)
    per_sample = distance(draws.distance, f_online, f_target, huber_c=config.huber_c, reduce=False)
    t_low, t_high = pair_timesteps(schedule, config, draws.n)
    return (per_sample * pair_weights(schedule, config, t_low, t_high).to(per_sample.device)).mean()
