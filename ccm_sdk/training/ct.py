"""The consistency-training (CT) objective (method doc, section 3.2), shared by three trainers.

    n ~ U{0..N-2} on the skipping-step grid t_0 < ... < t_{N-1} (or improved CT's lognormal); one noise z
    (with ``boundary``: t = 0 prepended and n ~ U{0..N-1}, so the lowest target is x_0 itself)
    x_{t_{n+1}} = sqrt(abar_{n+1}) x0 + sqrt(1 - abar_{n+1}) z,   x_{t_n} likewise with the same z
    loss = d( f(x_{t_{n+1}}, t_{n+1}),  stopgrad f(x_{t_n}, t_n) )

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
from .losses import pick_distance

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t [B]) -> raw model output


@dataclass
class ConsistencyDraws:
    """The random choices of one CT step (tests fix them to check the loss by hand)."""

    n: torch.Tensor  # [B] long: index of the lower grid point
    noise: torch.Tensor  # like the latents
    w: torch.Tensor  # [B] guidance w for the w-embedding
    distance: str  # a concrete distance (a 'random' config picks one per step)


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


def consistency_pair(
    online: Denoise,
    target: Denoise,
    schedule: NoiseSchedule,
    latents: torch.Tensor,
    draws: ConsistencyDraws,
    *,
    num_points: int,
    boundary: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x_{t_{n+1}}, t_{n+1}) with gradients, f(x_{t_n}, t_n) without), both float32."""
    t_low, t_high = grid_timesteps(schedule, num_points, draws.n, boundary=boundary)
    device = latents.device
    x_high = schedule.add_noise(latents, draws.noise, t_high)
    x_low = schedule.add_noise(latents, draws.noise, t_low)
    f_high, _ = schedule.consistency(online(x_high, t_high.to(device)).float(), x_high.float(), t_high)
    with torch.no_grad():
        f_low, _ = schedule.consistency(target(x_low, t_low.to(device)).float(), x_low.float(), t_low)
    return f_high, f_low
