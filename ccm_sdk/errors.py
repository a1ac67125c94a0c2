"""Typed errors raised at ccm-sdk's public boundary.

Every error says what was expected and what came. They subclass the matching builtin
(``ValueError``, ``TypeError``, ``LookupError``, ``OSError``) so generic handlers still work.
"""

from __future__ import annotations

from collections.abc import Iterable


class CCMError(Exception):
    """Base class of every error ccm-sdk raises on purpose."""


# --- bad input -------------------------------------------------------------------------


class InputError(CCMError, ValueError):
    """A value passed to the SDK is not one it accepts."""


class InputTypeError(CCMError, TypeError):
    """An argument has a type the SDK does not accept."""


class ShapeError(InputError):
    """A tensor or image has the wrong shape."""


class ChannelMismatchError(ShapeError):
    """An image or tensor has a channel count the consumer does not take."""


class ImageSizeError(ShapeError):
    """An image size does not fit (mismatch, not divisible by the VAE factor, too small)."""


class ImageTooLargeError(ImageSizeError):
    """An image is larger than the consumer takes (a server's size limit, a decompression bomb)."""


class NonFiniteError(InputError):
    """A tensor or a number holds NaN or infinity."""


class ValueRangeError(InputError):
    """A number, or a tensor's values, lie outside the range the consumer expects."""


class StepCountError(InputError):
    """A number of sampling steps outside the supported range."""


class DTypeError(InputTypeError):
    """A tensor has a dtype the consumer does not take."""


class FactoryNotAllowedError(InputError):
    """A config names code to run (an eval ``dataset.factory``) without the opt-in that allows it."""


# --- names and plugins -----------------------------------------------------------------


class UnknownNameError(CCMError, LookupError):
    """A condition, sampler, ControlNet provider or adapter name that nothing registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str]):
        self.kind, self.name, self.available = kind, name, sorted(available)
        listed = ", ".join(self.available) or "none"
        super().__init__(f"unknown {kind} {name!r}; available: {listed}")

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return self.args[0]


class PluginError(CCMError, RuntimeError):
    """A plugin failed to load or registered something invalid."""


class DuplicateNameError(PluginError):
    """Two plugins registered the same name for the same kind of extension."""


class ConditionOutputError(PluginError):
    """A condition returned a control map the Condition interface does not promise (not a float tensor
    ``[B, channels, H, W]`` of finite values in [0, 1]); the message names the condition and its plugin."""


# --- serving -----------------------------------------------------------------------------


class ServerBusyError(CCMError, RuntimeError):
    """A server's queue of waiting work is full (or it is shutting down); the request may be sent again later."""


# --- models ----------------------------------------------------------------------------


class ModelLoadError(CCMError, OSError):
    """A model folder, repository or weights file cannot be loaded."""


class MissingModelError(ModelLoadError):
    """A model folder, component or file that should exist does not."""


class CorruptWeightsError(ModelLoadError):
    """A weights file exists but cannot be read as safetensors / a state dict."""


class MissingWeightsError(CorruptWeightsError):
    """A weights file lacks tensors that its model's config calls for."""


class UnknownConfigKeyError(ModelLoadError):
    """A model's config.json holds keys its model class does not take (a typo, or another library version's key)."""


class IncompatibleModelsError(CCMError, ValueError):
    """Two models that must work together (UNet and ControlNet, ControlNet and adapter) do not fit."""


class TrainingError(CCMError, RuntimeError):
    """Training cannot go on (NaN loss, unusable dataset)."""


class CorruptCheckpointError(TrainingError):
    """A training checkpoint is damaged: a file is missing, truncated or unreadable, or needs pickle to load."""

    def __init__(self, checkpoint, file, reason: str):
        self.checkpoint, self.file, self.reason = str(checkpoint), str(file), reason
        super().__init__(f"checkpoint {self.checkpoint!r} is corrupt: {self.file!r}: {reason}")

    def __reduce__(self):  # pickles with its three arguments (for multiprocessing)
        return type(self), (self.checkpoint, self.file, self.reason)


class Interrupted(CCMError, RuntimeError):
    """Long work was asked to stop (SIGTERM, SIGUSR1, a time limit) after saving what it had done; run it again to go on."""


class TrainingInterrupted(TrainingError, Interrupted):
    """Training was asked to stop (SIGTERM, SIGUSR1, a time limit) and saved a checkpoint at the step it reached."""


class EvalInterrupted(Interrupted):
    """An evaluation was asked to stop between two of its cells; the finished cells are kept for ``--resume``."""
