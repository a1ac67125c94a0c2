"""An exact toy for consistency training of a control branch on a frozen consistency model.

The world's noise schedule and LCM parameterisation (v-prediction, zero terminal SNR, c_skip/c_out
with scale 10) on a mixture of K isotropic Gaussians in a few dimensions:

- the frozen base is the *exact* unconditional consistency function of the mixture (the LCM's
  stand-in): its probability-flow ODE solved from t to the data by DPM-Solver++(2M) with the exact
  denoiser E[x_0 | x_t], written as the raw output that the consistency parameterisation turns into
  that function;
- the control is the mode index k, and the ground truth is the exact conditional consistency
  function, in closed form: given k the data is one Gaussian N(m_k, s^2 I), whose ODE is linear,
  so f_k(x_t) = m_k + s / sqrt(abar s^2 + 1 - abar) (x_t - sqrt(abar) m_k);
- the ControlNet's stand-in is a zero-initialised branch that adds a residual to the base's raw
  output; a free network (no base) is there for comparison.

Training goes through the SDK's own consistency-training code (``ccm_sdk.training.ct``: the draws,
the pair schedule, the pair, the weighted distance), so a recipe measured here is the recipe the
CT ControlNet, adapter and DreamBooth trainers run. Measures: control accuracy (share of samples
nearest to the asked mode; 1/K is chance) at 1 and 4 steps through the SDK's consistency sampler,
and the one-step reconstruction error |f(x_t, t, k) - x_0| at the low-noise end (t = 39, the world's
noise-levels measure), relative to the frozen base's own error there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..sampling import sample_consistency
from ..schedule import NoiseSchedule

#: the embedded world's LCM scheduler (plugins/ccm-world/ccm_world/models/lcm/scheduler)
WORLD_SCHEDULER_CONFIG = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}

LOW_END_TIMESTEP = 39  # the second grid point: where CT's damage to the LCM showed first on the world


def world_schedule() -> NoiseSchedule:
    """The world LCM's noise schedule and consistency constants."""
    return NoiseSchedule.from_scheduler_config(WORLD_SCHEDULER_CONFIG)


@dataclass(frozen=True)
class GaussianMixture:
    """K equally likely isotropic Gaussians N(m_k, std^2 I)."""

    means: torch.Tensor  # [K, D]
    std: float

    @classmethod
    def corners(cls, dim: int = 2, modes: int = 4, std: float = 0.1, radius: float = 1.0) -> GaussianMixture:
        """Modes at distinct corners of the cube [-radius, radius]^dim (modes <= 2^dim)."""
        if not 2 <= modes <= 2**dim:
            raise InputError(f"expected 2..{2**dim} modes in {dim} dimensions, got {modes}")
        corners = [[radius if (index >> d) & 1 else -radius for d in range(dim)] for index in range(modes)]
        return cls(means=torch.tensor(corners, dtype=torch.float32), std=float(std))

    @property
    def modes(self) -> int:
        return self.means.shape[0]

    def sample(self, k: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(k.shape[0], self.means.shape[1], generator=generator)
        return self.means[k] + self.std * noise

    def nearest_mode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.float(), self.means).argmin(dim=1)

    def denoise(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] for x_t = sqrt(alpha) x_0 + sqrt(1 - alpha) z; ``alpha`` per sample [B]."""
        a = alpha.reshape(-1, 1, 1)
        var = a * self.std**2 + (1 - a)  # [B, 1, 1]: each component's marginal variance
        offset = x[:, None, :] - a.sqrt() * self.means[None]  # [B, K, D]
        logits = -offset.square().sum(-1) / (2 * var[:, :, 0])
        weights = torch.softmax(logits, dim=1)[..., None]
        posterior = self.means[None] + (a.sqrt() * self.std**2 / var) * offset
        return (weights * posterior).sum(1)

    def conditional_consistency(self, x: torch.Tensor, alpha: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The exact consistency function of N(m_k, std^2 I): where the ODE through x_t ends."""
        a = alpha.reshape(-1, 1)
        mean = self.means[k]
        return mean + self.std / (a * self.std**2 + 1 - a).sqrt() * (x - a.sqrt() * mean)

    def consistency(self, x: torch.Tensor, alpha: torch.Tensor, substeps: int = 32) -> torch.Tensor:
        """The mixture's own consistency function: its probability-flow ODE from x_t to the data,
        DPM-Solver++(2M) over substeps evenly spaced in log-SNR (a first DDIM hop out of alpha = 0)."""
        alpha = alpha.double().clamp(max=1.0)
        lam_end = math.log(1.0 / 2e-3)  # sigma / alpha = 0.002, far below the modes' width; then x_0 = D(x)
        lam_start = (0.5 * (alpha / (1 - alpha).clamp(min=1e-12)).log()).clamp(min=-8.0, max=lam_end)
        x = x.double()
        # an ODE that starts where alpha = 0 (zero terminal SNR) first jumps to lam = -8 exactly
        start_alpha = torch.sigmoid(2 * lam_start)  # alpha = 1 / (1 + e^{-2 lam})
        jump = alpha < start_alpha
        if bool(jump.any()):
            d = self.denoise(x.float(), alpha.float()).double()
            hop = start_alpha.sqrt()[:, None] * d + (1 - start_alpha).sqrt()[:, None] * (x - alpha.sqrt()[:, None] * d) / (
                1 - alpha
            ).sqrt()[:, None]
            x = torch.where(jump[:, None], hop, x)
        fractions = torch.linspace(0, 1, substeps + 1, dtype=torch.float64)
        lams = lam_start[:, None] + (lam_end - lam_start)[:, None] * fractions[None]  # [B, S+1]
        previous_d, previous_h = None, None
        for i in range(substeps):
            lam, lam_next = lams[:, i], lams[:, i + 1]
            a, a_next = torch.sigmoid(2 * lam), torch.sigmoid(2 * lam_next)
            d = self.denoise(x.float(), a.float()).double()
            h = lam_next - lam
            if previous_d is None:
                d_eff = d
            else:
                r = previous_h / h.clamp(min=1e-12)
                d_eff = (1 + 1 / (2 * r))[:, None] * d - (1 / (2 * r))[:, None] * previous_d
            sigma_ratio = ((1 - a_next) / (1 - a)).sqrt()
            x = sigma_ratio[:, None] * x + (a_next.sqrt() * -torch.expm1(-h))[:, None] * d_eff
            previous_d, previous_h = d, h
        final = torch.sigmoid(torch.tensor(2 * lam_end, dtype=torch.float64)).expand(x.shape[0])
        return self.denoise(x.float(), final.float())


def _raw_output(schedule: NoiseSchedule, f: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The raw network output whose consistency parameterisation at (x, t) gives f."""
    c_skip, c_out = (c.reshape(-1, 1) for c in schedule.scalings(t))
    x0 = (f - c_skip * x) / c_out
    a = schedule.alpha(t).reshape(-1, 1).float()
    if schedule.prediction_type == "v_prediction":
        return (a.sqrt() * x - x0) / (1 - a).sqrt()
    if schedule.prediction_type == "epsilon":
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return x0


class ExactBase:
    """A frozen, exact consistency model of ``mixture`` (the LCM's stand-in): raw output at (x, t)."""

    def __init__(self, schedule: NoiseSchedule, mixture: GaussianMixture, substeps: int = 32):
        self.schedule, self.mixture, self.substeps = schedule, mixture, substeps

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = self.schedule._per_sample(torch.as_tensor(t), x.shape[0], x.device).long()
        f = self.mixture.consistency(x, self.schedule.alpha(t), self.substeps)
        return _raw_output(self.schedule, f, x, t)


class ControlBranch(nn.Module):
    """A small MLP of (x_t, t, one-hot control) whose last layer starts at zero, as a ControlNet's do."""

    def __init__(self, dim: int, modes: int, width: int = 128, frequencies: int = 8):
        super().__init__()
        self.modes, self.frequencies = modes, frequencies
        self.net = nn.Sequential(
            nn.Linear(dim + 2 * frequencies + modes, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim),
        )  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scaled = t.float().reshape(-1, 1) / 1000.0 * (2.0 ** torch.arange(self.frequencies, device=x.device)) * math.pi
        features = [x, scaled.sin(), scaled.cos(), nn.functional.one_hot(k, self.modes).float()]
        return self.net(torch.cat(features, dim=1))


class ControlledModel:
    """base raw output + branch residual (the ControlNet's role), or the branch alone with ``base=None``."""

    def __init__(self, base: ExactBase | None, branch: ControlBranch):
        self.base, self.branch = base, branch

    def __call__(self, x: torch.Tensor, t, k: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).long().expand(x.shape[0])
        residual = self.branch(x, t, k)
        if self.base is None:
            return residual
        with torch.no_grad():
            base = self.base(x, t)
        return base + residual


@dataclass
class ToyMeasure:
    """What the toy measures of a model."""

    accuracy_1: float  # share of 1-step samples nearest the asked mode
    accuracy_4: float  # the same at 4 steps
    spread_1: float  # std of 1-step samples around their asked mode / the data's (1: right; 0: collapsed to the mean)
    spread_4: float  # the same at 4 steps
    function_error: float  # mean |f(z, T, k) - f*_k(z, T)| / the data's std: one step from pure noise against the exact function
    low_end_error: float  # one-step reconstruction error mean |f(x_t, t, k) - x_0| at LOW_END_TIMESTEP
    low_end_growth: float  # low_end_error / the frozen base's own (1.0: the base unchanged)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class ConsistencyToy:
    """The toy problem: a schedule, a mixture, the exact base, and the ground truth."""

    schedule: NoiseSchedule
    mixture: GaussianMixture
    base_mixture: GaussianMixture  # the distribution the frozen base is exact for (sharper: a guided base)

    @classmethod
    def build(cls, dim: int = 2, modes: int = 4, std: float = 0.1, base_std: float | None = None) -> ConsistencyToy:
        mixture = GaussianMixture.corners(dim, modes, std)
        base = mixture if base_std is None else GaussianMixture(mixture.means, float(base_std))
        return cls(schedule=world_schedule(), mixture=mixture, base_mixture=base)

    def base(self) -> ExactBase:
        return ExactBase(self.schedule, self.base_mixture)

    def branch(self, seed: int = 0) -> ControlBranch:
        torch.manual_seed(seed)
        return ControlBranch(self.mixture.means.shape[1], self.mixture.modes)

    def draw(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randint(self.mixture.modes, (batch,), generator=generator)
        return self.mixture.sample(k, generator), k

    @torch.no_grad()
    def measure(self, model: ControlledModel, samples: int = 2000, seed: int = 1234) -> ToyMeasure:
        generator = torch.Generator().manual_seed(seed)
        k = torch.arange(samples) % self.mixture.modes
        accuracy, spread = {}, {}
        for steps in (1, 4):
            noise = torch.randn(samples, self.mixture.means.shape[1], generator=generator)
            if steps == 1:
                top = torch.full((samples,), self.schedule.num_train_timesteps - 1)
                truth = self.mixture.conditional_consistency(noise, self.schedule.alpha(top), k)
            timesteps = self.schedule.scheduler_timesteps(_lcm_scheduler(), steps)
            out = sample_consistency(model, noise, timesteps, schedule=self.schedule, extra_args={"k": k}, generator=generator)
            if steps == 1:
                function_error = float((out - truth).abs().mean()) / self.mixture.std
            hit = self.mixture.nearest_mode(out) == k
            accuracy[steps] = float(hit.float().mean())
            spread[steps] = float((out - self.mixture.means[k])[hit].std()) / self.mixture.std if int(hit.sum()) > 1 else 0.0
        error, base_error = self._low_end_errors(model, k, generator)
        return ToyMeasure(accuracy[1], accuracy[4], spread[1], spread[4], function_error, error, error / base_error)

    def _low_end_errors(self, model: ControlledModel, k: torch.Tensor, generator: torch.Generator) -> tuple[float, float]:
        t = torch.full((k.shape[0],), LOW_END_TIMESTEP)
        x0 = self.mixture.sample(k, generator)
        x = self.schedule.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
        errors = []
        for candidate in (model, ControlledModel(self.base(), _ZeroBranch())):
            f, _ = self.schedule.consistency(candidate(x, t, k).float(), x, t)
            errors.append(float((f - x0).abs().mean()))
        return errors[0], errors[1]


class _ZeroBranch(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _lcm_scheduler():
    from diffusers import LCMScheduler

    return LCMScheduler


def train_branch(
    toy: ConsistencyToy,
    config,
    *,
    steps: int = 3000,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    free: bool = False,
    model: ControlledModel | None = None,
    callback=None,
) -> ControlledModel:
    """Train a zero-initialised branch on the frozen exact base (a free network with ``free``; or go on
    training ``model``) by the SDK's consistency-training loss under ``config`` (a ConsistencyConfig);
    ``callback(step, model)`` runs after each step."""
    from ..training import consistency_loss, consistency_pair, sample_draws

    if model is None:
        model = ControlledModel(None if free else toy.base(), toy.branch(seed))
    optimizer = torch.optim.Adam(model.branch.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x0, k = toy.draw(batch, generator)
        draws = sample_draws(x0, config, toy.schedule)
        denoise = lambda x, t: model(x, t, k)  # noqa: E731  (online and stopgrad target: the same weights)
        f_online, f_target = consistency_pair(denoise, denoise, toy.schedule, x0, draws, config)
        loss = consistency_loss(f_online, f_target, draws, toy.schedule, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if callback is not None:
            callback(step, model)
    return model
