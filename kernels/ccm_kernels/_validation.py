"""Input checks shared by the ops' public functions; every error says expected vs got."""

from __future__ import annotations

import torch

from .errors import KernelDeviceError, KernelDTypeError, KernelShapeError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require_tensor(name: str, value) -> torch.Tensor:
    """``value`` itself, or KernelDTypeError when it is not a tensor."""
    if not isinstance(value, torch.Tensor):
        raise KernelDTypeError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")
    return value


def require_float(name: str, tensor: torch.Tensor) -> None:
    """float32, float16 or bfloat16."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise KernelDTypeError(f"expected {name} of dtype float32, float16 or bfloat16, got {tensor.dtype}")


def require_like(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same shape, dtype and device as ``ref``."""
    if tensor.shape != ref.shape:
        raise KernelShapeError(f"expected {name} of shape {tuple(ref.shape)} (as {ref_name}), got {tuple(tensor.shape)}")
    require_same_dtype(name, tensor, ref_name, ref)
    require_same_device(name, tensor, ref_name, ref)


def require_same_dtype(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.dtype != ref.dtype:
        raise KernelDTypeError(f"expected {name} of dtype {ref.dtype} (as {ref_name}), got {tensor.dtype}")


def require_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise KernelDeviceError(f"expected {name} on {ref.device} (as {ref_name}), got {tensor.device}")
