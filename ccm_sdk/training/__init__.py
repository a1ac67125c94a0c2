"""Training: DM and CM ControlNets, the unified adapter, latent consistency distillation, DreamBooth,
and the models they start from: a KL autoencoder (``vae``) and a text-to-image diffusion UNet (``t2i``).

    from ccm_sdk.training import train, load_config
    result = train(load_config("ct_controlnet", "configs/train/ct_controlnet.yaml", [("train.max_steps", 10)]))

or ``ccm train <trainer> --config FILE [overrides]``; see docs/training.md. Trainers are a plugin
kind (``register_trainers``): each is a :class:`Trainer` subclass whose ``name`` selects it and
whose ``config_class`` sits in the same module; ``ccm_sdk.registry.trainers`` lists them. Imports
are lazy so the ``ccm`` command starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "TrainConfig": "config", "load_config": "config",
    "Trainer": "core", "TrainResult": "core",
    "build_text_encoder": "text_encoder",
    "config_class": "config", "validate_config": "config", "list_checkpoints": "checkpoint", "add_train_parser": "cli",
    # the consistency-training recipe's pieces, for analyses and tests that reproduce its loss
    "consistency_loss": "ct", "consistency_pair": "ct", "grid_timesteps": "ct", "sample_draws": "ct",
}  # fmt: skip

__all__ = ["get_trainer", "train", *_LAZY]

if TYPE_CHECKING:
    from .core import Trainer, TrainResult


def get_trainer(name: str) -> type[Trainer]:
    """The trainer class registered as ``name``; UnknownNameError lists the registered ones."""
    from ..registry import trainers

    return trainers.get(name)


def train(config: Any, *, dataset: Any = None) -> TrainResult:
    """Run the trainer that ``config`` (a TrainConfig subclass) names in its ``trainer`` key."""
    return get_trainer(config.trainer)(config, dataset=dataset).train()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name.endswith(("Trainer", "TrainConfig")):  # the built-in trainers and their configs, e.g. CTControlNetTrainer
        from ..registry import trainers

        for entry in trainers.entries():
            if entry.plugin == "ccm_sdk.builtin.trainers":
                for cls in (entry.obj, entry.obj.config_class):
                    if cls.__name__ == name:
                        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
