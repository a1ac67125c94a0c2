"""Fused GPU kernels for ccm-sdk, each with an exact plain-PyTorch reference.

Ops (also registered as ``torch.ops.ccm_kernels.*``, traceable by ``torch.compile``):

- :func:`consistency_step`: x0 from the model output, the c_skip/c_out blend, optional noise.
- :func:`adapter_residual_block`: ``x + conv2(act(conv1(x) + bias1)) + bias2`` with fused epilogues.

The backend is chosen per call by ``CCM_KERNELS`` (``auto`` | ``triton`` | ``reference``); see
:func:`kernel_backend`. triton is optional: without it every op runs its reference.
"""

from ._backend import kernel_backend
from .adapter_residual import adapter_residual_block
from .consistency_step import consistency_step
from .errors import (
    KernelConfigError,
    KernelDeviceError,
    KernelDTypeError,
    KernelError,
    KernelInputError,
    KernelLaunchError,
    KernelShapeError,
    TritonUnavailableError,
)

__all__ = [
    "KernelConfigError",
    "KernelDTypeError",
    "KernelDeviceError",
    "KernelError",
    "KernelInputError",
    "KernelLaunchError",
    "KernelShapeError",
    "TritonUnavailableError",
    "adapter_residual_block",
    "consistency_step",
    "kernel_backend",
]
