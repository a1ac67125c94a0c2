"""Training: DM and CM ControlNets, the unified adapter, latent consistency distillation, DreamBooth,
and the models they start from: a KL autoencoder (``vae``) and a text-to-image diffusion UNet (``t2i``).

    from ccm_sdk.training import train, load_config
    result = train(load_config("ct_controlnet", "configs/train/ct_controlnet.yaml", [("train.max_steps", 10)]))

or ``ccm train <trainer> --config FILE [overrides]``; see docs/training.md. Imports are lazy so
the ``ccm`` command starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

TRAINER_CLASSES = {
    "dm_controlnet": ("dm_controlnet", "DMControlNetTrainer"),
    "ct_controlnet": ("ct_controlnet", "CTControlNetTrainer"),
    "adapter": ("adapter", "AdapterTrainer"),
    "lcd": ("lcd", "LCDTrainer"),
    "dreambooth": ("dreambooth", "DreamBoothTrainer"),
    "vae": ("vae", "VAETrainer"),
    "t2i": ("t2i", "T2ITrainer"),
}
TRAINERS = tuple(TRAINER_CLASSES)

_LAZY = {
    "AdapterTrainConfig": "config", "CTControlNetTrainConfig": "config", "DMControlNetTrainConfig": "config",
    "DreamBoothTrainConfig": "config", "LCDTrainConfig": "config", "TrainConfig": "config", "load_config": "config",
    "Trainer": "core", "TrainResult": "core",
    "VAETrainConfig": "config", "T2ITrainConfig": "config", "build_text_encoder": "text_encoder",
    "config_class": "config", "validate_config": "config", "list_checkpoints": "checkpoint", "add_train_parser": "cli",
    # the consistency-training recipe's pieces, for analyses and tests that reproduce its loss
    "consistency_loss": "ct", "consistency_pair": "ct", "grid_timesteps": "ct", "sample_draws": "ct",
    **{cls: module for module, cls in TRAINER_CLASSES.values()},
}  # fmt: skip

__all__ = ["TRAINERS", "get_trainer", "train", *_LAZY]

if TYPE_CHECKING:
    from .core import Trainer, TrainResult


def get_trainer(name: str) -> type[Trainer]:
    """The trainer class registered as ``name`` (one of :data:`TRAINERS`)."""
    import importlib

    from ..errors import InputError

    if name not in TRAINER_CLASSES:
        raise InputError(f"unknown trainer {name!r}; available: {', '.join(TRAINERS)}")
    module, cls = TRAINER_CLASSES[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def train(config: Any, *, dataset: Any = None) -> TrainResult:
    """Run the trainer that ``config`` (a TrainConfig subclass) belongs to."""
    return get_trainer(config.trainer)(config, dataset=dataset).train()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
