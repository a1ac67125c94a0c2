"""Samplers: small pure functions with one signature, after k-diffusion.

``model(x, t, **extra_args)`` returns the network's raw prediction (epsilon, v or x0, as the
schedule says); ``schedule`` turns it into x0 / epsilon / the consistency function. A sampler
never knows about text, ControlNets or adapters. ``callback`` gets a dict per step with
``x``, ``i``, ``t`` and ``denoised``. Random draws follow diffusers' order: one
``randn_tensor`` per noise injection, from ``generator``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .errors import InputError
from .interfaces import Model, StepCallback
from .schedule import NoiseSchedule


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _next(timesteps: torch.Tensor, i: int, clean_end: int = -1) -> int:
    return int(timesteps[i + 1]) if i + 1 < len(timesteps) else clean_end


@torch.no_grad()
def sample_consistency(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    generator=None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023; LCM, Luo et al. 2023)."""
    extra_args = extra_args or {}
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps):
        t = int(t)
        output = model(x, t, **extra_args)
        if i < last:
            denoised, x = schedule.consistency(output, x, t, noise=_noise_like(x, generator), t_next=_next(timesteps, i))
        else:
            denoised, _ = schedule.consistency(output, x, t)
            x = denoised
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": denoised})
    return x


@torch.no_grad()
def sample_tcd(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    generator=None,
    gamma: float = 0.3,
) -> torch.Tensor:
    """Strategic stochastic sampling of Trajectory Consistency Distillation (Zheng et al. 2024)."""
    if not 0.0 <= gamma <= 1.0:
        raise InputError(f"expected gamma in [0, 1], got {gamma}")
    extra_args = extra_args or {}
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps):
        t = int(t)
        output = model(x, t, **extra_args)
        t_prev = _next(timesteps, i, clean_end=0)
        t_s = int(torch.floor(torch.tensor((1 - gamma) * t_prev)))
        alpha_s, alpha_prev = schedule.alpha(t_s).to(x.device), schedule.alpha(t_prev).to(x.device)
        x0, eps = schedule.to_x0(output, x, t), schedule.to_eps(output, x, t)
        denoised = alpha_s.sqrt() * x0 + (1 - alpha_s).sqrt() * eps
        if gamma > 0 and i < last:
            ratio = alpha_prev / alpha_s
            x = ratio.sqrt() * denoised + (1 - ratio).sqrt() * _noise_like(x, generator)
        else:
            x = denoised
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0})
    return x


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    generator=None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song, Meng and Ermon 2021); eta > 0 adds DDPM-like noise."""
    extra_args = extra_args or {}
    for i, t in enumerate(timesteps):
        t = int(t)
        output = model(x, t, **extra_args)
        alpha, alpha_prev = schedule.alpha(t).to(x.device), schedule.alpha(_next(timesteps, i)).to(x.device)
        x0, eps = schedule.to_x0(output, x, t), schedule.to_eps(output, x, t)
        if schedule.clip_sample_range is not None:
            x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        std = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)) ** 0.5
        x = alpha_prev ** (0.5) * x0 + (1 - alpha_prev - std**2) ** (0.5) * eps
        if eta > 0:
            x = x + std * _noise_like(x, generator)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0})
    return x


@torch.no_grad()
def sample_with_scheduler(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    generator=None,
    scheduler=None,
) -> torch.Tensor:
    """Any diffusers scheduler's own step rule (DPM-Solver++, UniPC, Euler, ...)."""
    if scheduler is None:
        raise InputError("sample_with_scheduler needs a diffusers scheduler instance")
    extra_args = extra_args or {}
    scheduler.set_timesteps(len(timesteps))
    if not torch.equal(scheduler.timesteps.long().cpu(), timesteps.long().cpu()):
        if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise InputError(f"{type(scheduler).__name__} cannot run custom timesteps {timesteps.tolist()}")
        scheduler.set_timesteps(timesteps=[int(t) for t in timesteps])
    x = x * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(scheduler.timesteps):
        output = model(scheduler.scale_model_input(x, t), int(t), **extra_args)
        result = scheduler.step(output, t, x, **step_kwargs)
        x = result.prev_sample
        if callback is not None:
            denoised = getattr(result, "pred_original_sample", None)
            callback({"x": x, "i": i, "t": int(t), "denoised": denoised if denoised is not None else x})
    return x
