"""Built-in samplers: consistency (LCM multistep, optional TCD gamma), DDIM, any diffusers scheduler."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from pydantic import Field

from ..errors import InputError, UnknownNameError
from ..hookspecs import hookimpl
from ..interfaces import Options, Sampler
from ..sampling import sample_consistency, sample_ddim, sample_tcd, sample_with_scheduler
from ..schedule import NoiseSchedule, config_for


class ConsistencyOptions(Options):
    gamma: float | None = Field(default=None, ge=0.0, le=1.0, description="TCD stochasticity; None: plain LCM")
    original_inference_steps: int | None = Field(default=None, ge=1, description="skipping-step grid size")


class ConsistencySampler(Sampler):
    """Multistep consistency sampling on LCM's skipping-step timesteps (1 network call per step)."""

    name = "consistency"
    Options = ConsistencyOptions
    max_steps = 50

    def timesteps(self, schedule: NoiseSchedule, num_steps: int, strength: float = 1.0) -> torch.Tensor:
        return schedule.lcm_timesteps(num_steps, strength=strength, original_inference_steps=self.options.original_inference_steps)

    def sample(self, model, x, timesteps, *, schedule, callback=None, generator=None):
        if self.options.gamma is None:
            return sample_consistency(model, x, timesteps, schedule=schedule, callback=callback, generator=generator)
        return sample_tcd(model, x, timesteps, schedule=schedule, callback=callback, generator=generator, gamma=self.options.gamma)


class DDIMOptions(Options):
    eta: float = Field(default=0.0, ge=0.0, le=1.0)


class DDIMSampler(Sampler):
    """DDIM on the scheduler config's timestep spacing: the diffusion-model baseline."""

    name = "ddim"
    Options = DDIMOptions

    def timesteps(self, schedule: NoiseSchedule, num_steps: int, strength: float = 1.0) -> torch.Tensor:
        return schedule.scheduler_timesteps(diffusers.DDIMScheduler, num_steps, strength=strength)

    def sample(self, model, x, timesteps, *, schedule, callback=None, generator=None):
        return sample_ddim(model, x, timesteps, schedule=schedule, callback=callback, generator=generator, eta=self.options.eta)


class SchedulerOptions(Options):
    scheduler: str = Field(default="DPMSolverMultistepScheduler", description="a diffusers scheduler class name")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the scheduler config")


class DiffusersSchedulerSampler(Sampler):
    """Runs any diffusers scheduler (DPM-Solver++, UniPC, Euler, ...) with the model's scheduler config."""

    name = "scheduler"
    Options = SchedulerOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        cls = getattr(diffusers, self.options.scheduler, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            names = [n for n in dir(diffusers) if n.endswith("Scheduler") and n[0].isupper()]
            raise UnknownNameError("diffusers scheduler", self.options.scheduler, names)
        self.scheduler_cls = cls

    def _scheduler(self, schedule: NoiseSchedule):
        return self.scheduler_cls.from_config(config_for(self.scheduler_cls, {**schedule.scheduler_config, **self.options.config}))

    def timesteps(self, schedule: NoiseSchedule, num_steps: int, strength: float = 1.0) -> torch.Tensor:
        if strength != 1.0:
            raise InputError(f"the 'scheduler' sampler does not support img2img (strength={strength}); use 'consistency' or 'ddim'")
        scheduler = self._scheduler(schedule)
        scheduler.set_timesteps(num_steps)
        return scheduler.timesteps.long()

    def sample(self, model, x, timesteps, *, schedule, callback=None, generator=None):
        return sample_with_scheduler(
            model, x, timesteps, schedule=schedule, callback=callback, generator=generator, scheduler=self._scheduler(schedule)
        )


@hookimpl
def register_samplers(register):
    for sampler_cls in (ConsistencySampler, DDIMSampler, DiffusersSchedulerSampler):
        register(sampler_cls)
