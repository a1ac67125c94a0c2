"""Plain-PyTorch references of every ccm_kernels op. Nothing here imports triton."""

from .adapter_residual import (
    ACTIVATIONS,
    activation_backward_reference,
    adapter_residual_block_reference,
    adapter_residual_forward_reference,
)
from .consistency_step import (
    PREDICTION_TYPES,
    consistency_step_backward_reference,
    consistency_step_reference,
)

__all__ = [
    "ACTIVATIONS",
    "PREDICTION_TYPES",
    "activation_backward_reference",
    "adapter_residual_block_reference",
    "adapter_residual_forward_reference",
    "consistency_step_backward_reference",
    "consistency_step_reference",
]
