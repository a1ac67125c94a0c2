"""ccm-sdk: real-time, controllable image generation with text-to-image consistency models.

    from ccm_sdk import CCMPipeline
    pipe = CCMPipeline.from_pretrained("world:lcm", controlnet="world:dm-controlnet-sketch")

The main names are importable from here; they load lazily (on first use), so ``import ccm_sdk``
and the ``ccm`` command's start-up do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .hookspecs import hookimpl
from .version import __version__

_LAZY = {
    "pipeline": ("CCMPipeline", "CCMOutput", "load_controlnet"),
    "registry": ("get_condition", "get_sampler", "get_dataset"),
    "interfaces": ("Adapter", "Condition", "ConditionOptions", "ControlNetProvider", "Options", "Sampler"),
    "training": ("TrainConfig", "get_trainer", "load_config", "train"),
    "eval": ("EvalConfig", "load_eval_config", "run_evaluation"),
    "plugins": ("plugin_failures", "plugin_infos"),
    "errors": (
        "CCMError", "InputError", "InputTypeError", "ShapeError", "ChannelMismatchError", "ImageSizeError",
        "ImageTooLargeError", "NonFiniteError", "ValueRangeError", "StepCountError", "DTypeError",
        "FactoryNotAllowedError", "UnknownNameError", "PluginError", "DuplicateNameError", "ServerBusyError",
        "ModelLoadError", "MissingModelError", "CorruptWeightsError", "MissingWeightsError", "UnknownConfigKeyError",
        "IncompatibleModelsError", "TrainingError", "Interrupted", "TrainingInterrupted", "EvalInterrupted",
    ),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["__version__", "hookimpl", *_MODULE_OF]

if TYPE_CHECKING:
    from .errors import *  # noqa: F403
    from .eval import EvalConfig, load_eval_config, run_evaluation
    from .interfaces import Adapter, Condition, ConditionOptions, ControlNetProvider, Options, Sampler
    from .pipeline import CCMOutput, CCMPipeline, load_controlnet
    from .plugins import plugin_failures, plugin_infos
    from .registry import get_condition, get_dataset, get_sampler
    from .training import TrainConfig, get_trainer, load_config, train


def __getattr__(name: str):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
