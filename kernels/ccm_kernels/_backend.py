"""Backend choice (``CCM_KERNELS``) and launch settings shared by the Triton ops.

Nothing here imports triton at module level: the reference path must work without it.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .errors import KernelConfigError, KernelLaunchError, TritonUnavailableError

ENV_VAR = "CCM_KERNELS"
BACKENDS = ("auto", "triton", "reference")
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (and z); gridDim.x allows 2**31 - 1
_INTERPRETER_BLOCK_CAP = 1 << 16  # the interpreter pays per program, not per lane


def requested_backend() -> str:
    """The ``CCM_KERNELS`` setting: ``auto`` (default), ``triton`` or ``reference``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise KernelConfigError(f"expected {ENV_VAR} in {BACKENDS}, got {value!r}")
    return value


@functools.cache
def _triton_import_error() -> str | None:
    """None when triton imports, else why not (cached: an import is tried once per process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """Whether ``import triton`` works in this process."""
    return _triton_import_error() is None


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks triton to run kernels in its numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _require_triton() -> None:
    error = _triton_import_error()
    if error is not None:
        raise TritonUnavailableError(
            f"{ENV_VAR}=triton was requested but triton cannot be imported ({error}); "
            f"install triton (pip install 'ccm-sdk[gpu]') or set {ENV_VAR}=auto or reference"
        )


def kernel_backend() -> str:
    """``"triton"`` or ``"reference"``: what the ops use right now for CUDA tensors.

    Raises TritonUnavailableError when ``CCM_KERNELS=triton`` but triton cannot be imported.
    """
    requested = requested_backend()
    if requested == "reference":
        return "reference"
    if requested == "triton":
        _require_triton()
        return "triton"
    return "triton" if triton_available() else "reference"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernel (True) or the torch reference.

    CUDA tensors take Triton under ``auto`` (when triton imports) and ``triton``. CPU tensors take
    it only when ``triton`` is forced and ``TRITON_INTERPRET=1`` (how the parity tests run it);
    other devices always take the reference.
    """
    requested = requested_backend()
    if requested == "reference":
        return False
    if requested == "auto":
        return tensor.device.type == "cuda" and triton_available()
    _require_triton()
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and interpreter_enabled()


def block_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of ``n`` elements handled by one program per block."""
    n_pow2 = 1 << max(n - 1, 0).bit_length()
    if interpreter_enabled():
        return min(max(n_pow2, 16), _INTERPRETER_BLOCK_CAP), 1
    block = min(max(n_pow2, 128), 1024)
    return block, max(1, min(4, block // 256))


def check_grid_y(blocks: int, what: str) -> None:
    """Fail loudly before a launch whose second grid axis would exceed CUDA's limit."""
    if blocks > MAX_GRID_Y:
        raise KernelLaunchError(
            f"{what} needs {blocks} blocks on grid axis 1, more than CUDA's limit of {MAX_GRID_Y}; "
            f"use CCM_KERNELS=reference for tensors this large"
        )


def device_guard(tensor: torch.Tensor):
    """``torch.cuda.device`` for CUDA tensors (Triton launches on the current device), else a no-op."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
