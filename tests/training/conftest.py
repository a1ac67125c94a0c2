"""Training-test fixtures: config factories for the tiny models (the models and the square-image
datasets come from tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ccm_sdk.training.config import config_class, resolve_key, validate_config
from ccm_sdk.utils.config_files import set_path

TINY_CONTROL_EMBEDDING = [8, 16, 16, 32]  # three stride-2 convs: the tiny VAE's factor 8
TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and other jobs share these cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(lcm_dir, sd_dir, sd_controlnet_dir, controlnet_b_dir) -> dict[str, dict[str, Any]]:
    """Per trainer, the config keys that point it at the tiny models."""
    return {
        "dm_controlnet": {"model": str(sd_dir), "conditioning_embedding_out_channels": TINY_CONTROL_EMBEDDING},
        "ct_controlnet": {"model": str(lcm_dir), "conditioning_embedding_out_channels": TINY_CONTROL_EMBEDDING},
        "adapter": {
            "model": str(lcm_dir),
            "controlnets": [
                {"path": str(sd_controlnet_dir), "condition": "canny", "control_key": "control"},
                {"path": str(controlnet_b_dir), "condition": "sr", "condition_options": {"factor": 4}},
            ],
        },
        "lcd": {"model": str(sd_dir), "time_cond_proj_dim": 32, "lora": {"rank": 4}},
        "dreambooth": {"model": str(lcm_dir), "instance_prompt": "a photo of sks square", "lora": {"rank": 4}},
    }


@pytest.fixture()
def make_config(tmp_path, squares, tiny_models):
    """``make_config(trainer, **overrides)``: a small valid config on the tiny models; override
    keys are dotted paths written with ``__`` (``train__max_steps=3``)."""

    def make(trainer: str, **overrides: Any):
        raw: dict[str, Any] = {
            "trainer": trainer,
            "output_dir": str(tmp_path / f"out-{trainer}"),
            "data": {"path": str(squares)},
            # CPU everywhere: bit-exact resume and the gloo test need it, and tiny models gain nothing from a GPU
            "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-4, "num_threads": 1, "device": "cpu"},
            "checkpoint": {"every": 2, "keep_last": 2},
            "log": {"progress": False, "plot": False},
            **tiny_models[trainer],
        }
        if trainer in ("ct_controlnet", "adapter", "dreambooth"):
            # the hand-computed losses follow the paper's pairs and L1; tests of other recipes set their own
            raw["consistency"] = {"recipe": "ccm", **raw.get("consistency", {})}
        cls = config_class(trainer)
        for key, value in overrides.items():
            set_path(raw, resolve_key(cls, key.replace("__", ".")), value)
        return validate_config(cls, raw)

    return make


@pytest.fixture()
def vae_config(tmp_path, squares):
    """``vae_config(**overrides)``: the quickest trainer (a tiny VAE, six steps, checkpoints every four),
    for tests of the training loop itself (stopping, resuming)."""
    from ccm_sdk.training.vae import VAETrainConfig

    def make(**overrides):
        raw = {
            "trainer": "vae", "output_dir": str(tmp_path / "out"), "architecture": dict(TINY_VAE), "data": {"path": str(squares)},
            "train": {"max_steps": 6, "batch_size": 2, "lr": 2e-3, "num_threads": 1, "device": "cpu"},
            "checkpoint": {"every": 4, "keep_last": 3}, "log": {"progress": False, "plot": False}, "scaling_factor": 0.5,
        }  # fmt: skip
        for key, value in overrides.items():
            set_path(raw, resolve_key(VAETrainConfig, key.replace("__", ".")), value)
        return validate_config(VAETrainConfig, raw)

    return make


class ByHand:
    """The method's formulas written out with diffusers' own helpers, independent of ccm_sdk."""

    def __init__(self):
        from ccm_sdk.testing.tiny import lcm_scheduler

        self.scheduler = lcm_scheduler()
        self.alphas = self.scheduler.alphas_cumprod

    @staticmethod
    def grid(num_points: int, num_train_timesteps: int = 1000) -> torch.Tensor:
        """diffusers' DDIMSolver timesteps: k-1, 2k-1, ..., T-1."""
        return torch.arange(1, num_points + 1) * (num_train_timesteps // num_points) - 1

    def _coef(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas[t].reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._coef(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def x0(self, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._coef(t, x)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def f(self, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """c_skip(t) x + c_out(t) x0, the scalings from LCMScheduler, one sample at a time."""
        rows = []
        for i, ti in enumerate(t.tolist()):
            c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(ti)
            rows.append(c_skip * x[i] + c_out * self.x0(eps[i : i + 1], x[i : i + 1], t[i : i + 1])[0])
        return torch.stack(rows)

    @staticmethod
    def w_embedding(w: torch.Tensor, dim: int = 32) -> torch.Tensor:
        from diffusers import LatentConsistencyModelPipeline

        return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


@pytest.fixture(scope="session")
def by_hand() -> ByHand:
    return ByHand()


@pytest.fixture()
def fixed_batches():
    """``fixed_batches(trainer, count)``: collated batches of two with their encoded inputs (seeded)."""
    from ccm_sdk.datasets import collate

    def make(trainer, count: int = 1):
        torch.manual_seed(123)
        batches = [collate([trainer.dataset[2 * j], trainer.dataset[2 * j + 1]]) for j in range(count)]
        return batches, [trainer.prepare_inputs(b) for b in batches]

    return make


@pytest.fixture()
def eval_loss(fixed_batches):
    """``eval_loss(trainer)``: a function giving the mean loss over fixed batches and fixed draws,
    to compare before and after training."""

    def make(trainer):
        _, inputs = fixed_batches(trainer, 4)
        torch.manual_seed(7)
        draws = [[trainer.sample_draws(x) for _ in range(3)] for x in inputs]

        def evaluate() -> float:
            with torch.no_grad():
                torch.manual_seed(11)  # control maps drawn inside compute_loss (adapter) repeat too
                return sum(trainer.compute_loss(x, d).item() for x, ds in zip(inputs, draws) for d in ds) / 12

        return evaluate

    return make


@pytest.fixture()
def assert_gradients():
    """``assert_gradients(trainable, frozen)``: after a backward pass, every parameter of
    ``trainable`` that requires grad has a gradient, some non-zero; ``frozen`` modules have none."""

    def check(trainable: torch.nn.Module, frozen: list[torch.nn.Module], *, names=None) -> None:
        params = [(n, p) for n, p in trainable.named_parameters() if p.requires_grad]
        if names is not None:
            assert sorted(n for n, _ in params) == sorted(names)
        assert params, "nothing trains"
        missing = [n for n, p in params if p.grad is None]
        assert not missing, f"no gradient reached {missing[:5]}"
        assert sum(float(p.grad.abs().sum()) for _, p in params) > 0
        for module in frozen:
            for name, p in module.named_parameters():
                assert not p.requires_grad and p.grad is None, f"frozen parameter {name} takes part in training"

    return check
