"""Errors raised by ccm_kernels; each says what was expected and what came.

They subclass the matching builtin (``ValueError``, ``TypeError``, ``RuntimeError``), so generic
handlers keep working. ccm_kernels does not import ccm_sdk, so these form their own small tree.
"""

from __future__ import annotations


class KernelError(Exception):
    """Base class of every error ccm_kernels raises on purpose."""


class KernelInputError(KernelError, ValueError):
    """An argument has a value the op does not accept."""


class KernelShapeError(KernelInputError):
    """A tensor has the wrong shape or does not match its partner."""


class KernelDeviceError(KernelInputError):
    """Tensors that must live on one device do not."""


class KernelDTypeError(KernelError, TypeError):
    """A tensor has a dtype the op does not take, or is not a tensor at all."""


class KernelConfigError(KernelInputError):
    """The ``CCM_KERNELS`` environment variable holds an unknown value."""


class TritonUnavailableError(KernelError, RuntimeError):
    """``CCM_KERNELS=triton`` was requested but triton cannot be imported."""


class KernelLaunchError(KernelError, RuntimeError):
    """A launch limit (grid size) would be exceeded; the message names the limit."""
