"""The discrete noise schedule and the consistency parameterisation (method doc, section 1).

    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2)
    c_out(t)  = s t / sqrt((s t)^2 + sigma_data^2)
    f(x, t)   = c_skip(t) x + c_out(t) x0(x, model_output, t)

Timesteps may be a scalar or one per sample. Formulas follow diffusers' LCMScheduler operation
for operation, so results match it in float32.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError, StepCountError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class NoiseSchedule:
    """alphas_cumprod of a DDPM-style schedule plus the consistency-model constants."""

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    original_inference_steps: int = 50
    clip_sample_range: float | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    _coefficient_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"expected prediction_type in {PREDICTION_TYPES}, got {self.prediction_type!r}")

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config (any DDPM-family scheduler's config.json)."""
        from diffusers import LCMScheduler

        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        if config.get("thresholding"):
            raise InputError("dynamic thresholding is not supported; set thresholding=false in the scheduler config")
        lcm = LCMScheduler.from_config(config)
        return cls(
            alphas_cumprod=lcm.alphas_cumprod.float(),
            final_alpha_cumprod=torch.as_tensor(lcm.final_alpha_cumprod, dtype=torch.float32),
            prediction_type=lcm.config.prediction_type,
            timestep_scaling=float(config.get("timestep_scaling", 10.0)),
            original_inference_steps=int(config.get("original_inference_steps", 50)),
            clip_sample_range=float(lcm.config.clip_sample_range) if lcm.config.clip_sample else None,
            scheduler_config=config,
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    # --- per-timestep coefficients ------------------------------------------------------

    def alpha(self, t: torch.Tensor | int) -> torch.Tensor:
        """abar_t per entry of ``t``; negative timesteps give the final alpha (the clean end)."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        clamped = t.clamp(min=0)
        return torch.where(t >= 0, self.alphas_cumprod[clamped], self.final_alpha_cumprod)

    def scalings(self, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) per entry of ``t``."""
        scaled = torch.as_tensor(t).cpu() * self.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        return c_skip.float(), c_out.float()

    def _per_sample(self, value: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        value = value.reshape(-1).to(device=device, dtype=torch.float32)
        if value.numel() == 1:
            return value.expand(batch).contiguous()
        if value.numel() != batch:
            raise InputError(f"expected 1 or {batch} timesteps (one per sample), got {value.numel()}")
        return value

    # --- conversions --------------------------------------------------------------------

    def to_x0(self, model_output: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        """Predicted clean sample from the model output."""
        a = _bcast(self._per_sample(self.alpha(t), x.shape[0], x.device), x)
        if self.prediction_type == "epsilon":
            return (x - (1 - a).sqrt() * model_output) / a.sqrt()
        if self.prediction_type == "v_prediction":
            return a.sqrt() * x - (1 - a).sqrt() * model_output
        return model_output

    def to_eps(self, model_output: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        """Predicted noise from the model output."""
        a = _bcast(self._per_sample(self.alpha(t), x.shape[0], x.device), x)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return a.sqrt() * model_output + (1 - a).sqrt() * x
        return (x - a.sqrt() * model_output) / (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """q(x_t | x0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a = _bcast(self._per_sample(self.alpha(t), x0.shape[0], x0.device), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def consistency(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t,
        *,
        noise: torch.Tensor | None = None,
        t_next=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """f(x, t) = c_skip x + c_out x0, and optionally x_next = sqrt(abar') f + sqrt(1-abar') noise.

        Runs through ``ccm_kernels.consistency_step``: the fused Triton kernel on CUDA, the exact
        PyTorch reference elsewhere.
        """
        from ccm_kernels import consistency_step

        if noise is not None and t_next is None:
            raise InputError("noise injection needs t_next (a negative t_next means the clean end)")
        coeffs = self._step_coefficients(t, t_next if noise is not None else None, x.shape[0], x.device)
        kwargs: dict[str, Any] = {}
        if noise is not None:
            kwargs = dict(noise=noise, sqrt_alpha_next=coeffs[4], sqrt_one_minus_alpha_next=coeffs[5])
        return consistency_step(
            model_output,
            x,
            *coeffs[:4],
            prediction_type=self.prediction_type,
            clip_sample_range=self.clip_sample_range,
            **kwargs,
        )

    def _step_coefficients(self, t, t_next, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per-sample (sqrt a, sqrt 1-a, c_skip, c_out[, sqrt a', sqrt 1-a']); cached for scalar timesteps,
        since a sampler asks for the same few every image."""
        key = (t, t_next, batch, str(device)) if isinstance(t, int) and isinstance(t_next, (int, type(None))) else None
        cached = self._coefficient_cache.get(key) if key is not None else None
        if cached is not None:
            return cached
        alpha = self._per_sample(self.alpha(t), batch, device)
        c_skip, c_out = (self._per_sample(c, batch, device) for c in self.scalings(t))
        coeffs: tuple[torch.Tensor, ...] = (alpha.sqrt(), (1 - alpha).sqrt(), c_skip, c_out)
        if t_next is not None:
            alpha_next = self._per_sample(self.alpha(t_next), batch, device)
            coeffs += (alpha_next.sqrt(), (1 - alpha_next).sqrt())
        if key is not None:
            if len(self._coefficient_cache) > 512:
                self._coefficient_cache.clear()
            self._coefficient_cache[key] = coeffs
        return coeffs

    # --- timestep schedules -------------------------------------------------------------

    def lcm_timesteps(self, num_steps: int, *, strength: float = 1.0, original_inference_steps: int | None = None) -> torch.Tensor:
        """LCM's inference schedule: ``num_steps`` evenly spaced indices into the skipping-step grid."""
        original = original_inference_steps or self.original_inference_steps
        if not 0 < strength <= 1:
            raise InputError(f"expected strength in (0, 1], got {strength}")
        if original > self.num_train_timesteps:
            raise InputError(f"original_inference_steps {original} exceeds the {self.num_train_timesteps} training timesteps")
        origin = self.skipping_grid(original, strength=strength)
        if not 1 <= num_steps <= len(origin):
            raise StepCountError(
                f"expected 1..{len(origin)} steps for original_inference_steps={original} and strength={strength}, got {num_steps}"
            )
        descending = origin[::-1].copy()
        indices = np.floor(np.linspace(0, len(descending), num=num_steps, endpoint=False)).astype(np.int64)
        return torch.from_numpy(descending[indices].copy()).long()

    def skipping_grid(self, num_points: int, *, strength: float = 1.0) -> np.ndarray:
        """Ascending timesteps k-1, 2k-1, ... with skipping step k = T // num_points (LCM training grid)."""
        k = self.num_train_timesteps // num_points
        return np.arange(1, int(num_points * strength) + 1, dtype=np.int64) * k - 1

    def scheduler_timesteps(self, scheduler_cls, num_steps: int, *, strength: float = 1.0) -> torch.Tensor:
        """Timesteps that a diffusers scheduler class picks for this config (img2img strength applied)."""
        scheduler = scheduler_cls.from_config(config_for(scheduler_cls, self.scheduler_config))
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.long()
        keep = min(int(num_steps * strength), num_steps)
        if keep < 1:
            raise InputError(f"strength {strength} leaves no step out of {num_steps}")
        return timesteps[len(timesteps) - keep * scheduler.order :] if strength < 1 else timesteps


def _bcast(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def guidance_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LCM's Fourier embedding of the guidance scale, fed to the UNet as ``timestep_cond``.

    Pass w = guidance_scale - 1, as the LCM pipelines do.
    """
    w = torch.as_tensor(w).reshape(-1) * 1000.0
    half = dim // 2
    # float32 log, as diffusers does: the phase reaches ~1e4 rad, so a double-precision
    # constant would shift sin/cos by ~1e-3.
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def config_for(scheduler_cls, config: dict[str, Any]) -> dict[str, Any]:
    """The entries of a scheduler config that ``scheduler_cls`` accepts (diffusers warns on others)."""
    accepted = inspect.signature(scheduler_cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}
