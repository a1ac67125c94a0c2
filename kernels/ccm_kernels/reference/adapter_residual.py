"""Reference adapter residual block: ``x + conv2(act(conv1(x) + bias1)) + bias2`` in plain torch.

Convolutions are stride 1 with 'same' padding (k // 2, odd k). Each bias is added to the
convolution's output as a separate op, as eager PyTorch does on CUDA (cuDNN convolution, then a
bias add), so half-precision rounding happens at the same points as in the fused kernels. The
backward of the activation uses torch's own autograd kernels (exactly eager autograd's gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "relu")


def apply_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """silu, exact (erf) gelu or relu of ``z``."""
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "relu":
        return F.relu(z)
    raise ValueError(f"expected activation in {ACTIVATIONS}, got {activation!r}")


def adapter_residual_forward_reference(
    x: torch.Tensor,
    weight1: torch.Tensor,
    bias1: torch.Tensor,
    weight2: torch.Tensor,
    bias2: torch.Tensor,
    *,
    activation: str = "silu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, hidden = act(preact), preact = conv1(x) + bias1); out = x + (conv2(hidden) + bias2)."""
    preact = F.conv2d(x, weight1, padding=weight1.shape[-1] // 2) + bias1.reshape(-1, 1, 1)
    hidden = apply_activation(preact, activation)
    out = x + (F.conv2d(hidden, weight2, padding=weight2.shape[-1] // 2) + bias2.reshape(-1, 1, 1))
    return out, hidden, preact


def adapter_residual_block_reference(
    x: torch.Tensor,
    weight1: torch.Tensor,
    bias1: torch.Tensor,
    weight2: torch.Tensor,
    bias2: torch.Tensor,
    *,
    activation: str = "silu",
) -> torch.Tensor:
    """``x + conv2(act(conv1(x) + bias1)) + bias2``; differentiable through ordinary autograd."""
    return adapter_residual_forward_reference(x, weight1, bias1, weight2, bias2, activation=activation)[0]


def activation_backward_reference(grad_hidden: torch.Tensor, preact: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(preact) / d preact times ``grad_hidden``, with torch's autograd kernels."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad_hidden, preact)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_hidden, preact, approximate="none")
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad_hidden, F.relu(preact), 0)
    raise ValueError(f"expected activation in {ACTIVATIONS}, got {activation!r}")
