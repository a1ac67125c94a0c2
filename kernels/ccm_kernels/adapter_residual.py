"""Adapter residual block ``x + conv2(act(conv1(x) + bias1)) + bias2`` with fused Triton epilogues.

The convolutions stay with torch (cuDNN); Triton fuses what eager PyTorch runs as separate passes
around them: bias1 + activation after conv1 (one read, one or two writes), bias2 + the residual add
after conv2 (two reads, one write, in place), and the activation's derivative in the backward.
The backward convolutions use ``aten.convolution_backward``.

Registered as ``torch.ops.ccm_kernels.adapter_residual_block`` (+ ``adapter_activation_backward``):
the op dispatches to the Triton path or to :mod:`ccm_kernels.reference.adapter_residual`.
"""

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend
from ._validation import require_float, require_same_device, require_same_dtype, require_tensor
from .errors import KernelInputError, KernelShapeError
from .reference.adapter_residual import (
    ACTIVATIONS,
    activation_backward_reference,
    adapter_residual_forward_reference,
)

_ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}  # silu 0, gelu 1, relu 2


# --- Triton kernels (built on first use: triton is optional) -----------------------------------


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Define the kernels; ``interpret`` keys the cache since ``triton.jit`` reads TRITON_INTERPRET."""
    import triton
    import triton.language as tl

    @triton.jit
    def _bias_activation_kernel(
        conv_ptr, bias_ptr, hidden_ptr, preact_ptr, hw, channels,
        ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # grid = (B * channels, blocks per plane): one bias value per program
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hw
        offs = row.to(tl.int64) * hw + cols
        z = tl.load(conv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = z + tl.load(bias_ptr + row % channels).to(tl.float32)
        z = z.to(preact_ptr.dtype.element_ty).to(tl.float32)  # eager rounds conv + bias1 here
        if ACTIVATION == 0:  # silu, as torch: z / (1 + exp(-z))
            a = tl.math.div_rn(z, 1.0 + tl.exp(-z))
        elif ACTIVATION == 1:  # exact gelu, as torch: z * 0.5 * (1 + erf(z / sqrt(2)))
            a = z * 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        else:  # relu; where(z < 0) keeps NaN as torch.relu does
            a = tl.where(z < 0.0, 0.0, z)
        tl.store(hidden_ptr + offs, a.to(hidden_ptr.dtype.element_ty), mask=mask)
        if STORE_PREACT:
            tl.store(preact_ptr + offs, z.to(preact_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_residual_kernel(conv_ptr, bias_ptr, x_ptr, out_ptr, hw, channels, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hw
        offs = row.to(tl.int64) * hw + cols
        y = tl.load(conv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = y + tl.load(bias_ptr + row % channels).to(tl.float32)
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # eager rounds conv + bias2 here
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (x + y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _activation_backward_kernel(grad_ptr, preact_ptr, out_ptr, numel, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
        # same formulas as torch's silu_backward / gelu_backward / threshold_backward
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(preact_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION == 0:
            s = tl.math.div_rn(1.0, 1.0 + tl.exp(-z))
            d = g * s * (1.0 + z * (1.0 - s))
        elif ACTIVATION == 1:
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            pdf = 0.3989422804014327 * tl.exp(z * z * -0.5)  # 1 / sqrt(2 pi)
            d = g * (cdf + z * pdf)
        else:
            d = tl.where(z <= 0.0, 0.0, g)
        tl.store(out_ptr + offs, d.to(out_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(
        bias_activation=_bias_activation_kernel,
        bias_residual=_bias_residual_kernel,
        activation_backward=_activation_backward_kernel,
    )


# --- launchers ---------------------------------------------------------------------------------


def _plane_grid(t: Tensor, what: str) -> tuple[tuple[int, int], int, int, int]:
    """((B * C, blocks per plane), H * W, BLOCK, num_warps) for a contiguous [B, C, H, W] tensor."""
    batch, channels, height, width = t.shape
    hw = height * width
    block, num_warps = _backend.block_config(hw)
    blocks = -(-hw // block)
    _backend.check_grid_y(blocks, what)
    return (batch * channels, blocks), hw, block, num_warps


def _launch_forward(
    x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, activation: str, save_preactivation: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, hidden, preact or empty) via torch convolutions and the two fused epilogues."""
    x, weight1, bias1, weight2, bias2 = (t.contiguous() for t in (x, weight1, bias1, weight2, bias2))
    kernels = _kernels(_backend.interpreter_enabled())
    with _backend.device_guard(x):
        # 1. conv1 without bias; bias1 + activation fused, the pre-activation kept in place if needed
        conv1 = F.conv2d(x, weight1, None, padding=weight1.shape[-1] // 2).contiguous()
        hidden = torch.empty_like(conv1)
        grid, hw, block, num_warps = _plane_grid(conv1, "adapter_residual_block (conv1 epilogue)")
        kernels.bias_activation[grid](
            conv1, bias1, hidden, conv1, hw, conv1.shape[1],
            ACTIVATION=_ACTIVATION_CODES[activation], STORE_PREACT=save_preactivation, BLOCK=block,
            num_warps=num_warps,
        )  # fmt: skip
        # 2. conv2 without bias; bias2 + residual add fused, written over the conv2 output
        out = F.conv2d(hidden, weight2, None, padding=weight2.shape[-1] // 2).contiguous()
        grid, hw, block, num_warps = _plane_grid(out, "adapter_residual_block (conv2 epilogue)")
        kernels.bias_residual[grid](out, bias2, x, out, hw, out.shape[1], BLOCK=block, num_warps=num_warps)
    return out, hidden, (conv1 if save_preactivation else x.new_empty((0,)))


def _launch_activation_backward(grad_hidden: Tensor, preact: Tensor, activation: str) -> Tensor:
    grad_hidden, preact = grad_hidden.contiguous(), preact.contiguous()
    grad_preact = torch.empty_like(preact)
    numel = preact.numel()
    block, num_warps = _backend.block_config(numel)
    with _backend.device_guard(preact):
        _kernels(_backend.interpreter_enabled()).activation_backward[(-(-numel // block),)](
            grad_hidden, preact, grad_preact, numel, ACTIVATION=_ACTIVATION_CODES[activation], BLOCK=block,
            num_warps=num_warps,
        )  # fmt: skip
    return grad_preact


# --- torch.library registration ----------------------------------------------------------------


def _empty_outputs(x: Tensor, weight1: Tensor, save_preactivation: bool) -> tuple[Tensor, Tensor, Tensor]:
    batch, _, height, width = x.shape
    hidden = x.new_empty((batch, weight1.shape[0], height, width))
    preact = torch.empty_like(hidden) if save_preactivation else x.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), hidden, preact


@torch.library.custom_op("ccm_kernels::adapter_residual_block", mutates_args=())
def _adapter_residual_op(
    x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, activation: str, save_preactivation: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, hidden = act(preact), preact = conv1(x) + bias1 or an empty tensor when not saved)."""
    if x.numel() == 0:
        return _empty_outputs(x, weight1, save_preactivation)
    if _backend.use_triton(x):
        return _launch_forward(x, weight1, bias1, weight2, bias2, activation, save_preactivation)
    out, hidden, preact = adapter_residual_forward_reference(x, weight1, bias1, weight2, bias2, activation=activation)
    return out.contiguous(), hidden.contiguous(), (preact.contiguous() if save_preactivation else x.new_empty((0,)))


@_adapter_residual_op.register_fake
def _(x, weight1, bias1, weight2, bias2, activation, save_preactivation):
    return _empty_outputs(x, weight1, save_preactivation)


@torch.library.custom_op("ccm_kernels::adapter_activation_backward", mutates_args=())
def _activation_backward_op(grad_hidden: Tensor, preact: Tensor, activation: str) -> Tensor:
    """d act / d preact times ``grad_hidden``."""
    if preact.numel() == 0:
        return torch.empty_like(preact, memory_format=torch.contiguous_format)
    if _backend.use_triton(preact):
        return _launch_activation_backward(grad_hidden, preact, activation)
    return activation_backward_reference(grad_hidden, preact, activation).contiguous()


@_activation_backward_op.register_fake
def _(grad_hidden, preact, activation):
    return torch.empty_like(preact, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    x, weight1, bias1, weight2, _, activation, _ = inputs
    _, hidden, preact = output
    ctx.activation = activation
    ctx.mark_non_differentiable(hidden, preact)
    ctx.save_for_backward(x, weight1, bias1, weight2, hidden, preact)


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, mask: list[bool]):
    pad = weight.shape[-1] // 2
    return torch.ops.aten.convolution_backward(
        grad, inp, weight, [weight.shape[0]], [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, mask
    )


def _backward(ctx, grad_out: Tensor, _grad_hidden, _grad_preact):
    x, weight1, bias1, weight2, hidden, preact = ctx.saved_tensors
    needs_x, needs_w1, needs_b1, needs_w2, needs_b2 = ctx.needs_input_grad[:5]
    if x.numel() == 0:  # nothing flowed through: zero gradients of the right shapes
        def zeros(needed: bool, like: Tensor):
            return torch.zeros_like(like) if needed else None

        grad_b2 = grad_out.new_zeros((weight2.shape[0],)) if needs_b2 else None
        return zeros(needs_x, x), zeros(needs_w1, weight1), zeros(needs_b1, bias1), zeros(needs_w2, weight2), grad_b2, None, None
    if preact.numel() == 0:  # the forward ran without saving it (no grad was expected): recompute
        preact = F.conv2d(x, weight1, padding=weight1.shape[-1] // 2) + bias1.reshape(-1, 1, 1)
    grad_out = grad_out.contiguous()
    need_hidden = needs_x or needs_w1 or needs_b1
    grad_hidden, grad_w2, grad_b2 = _conv_backward(grad_out, hidden, weight2, [need_hidden, needs_w2, needs_b2])
    grad_x = grad_w1 = grad_b1 = None
    if need_hidden:
        grad_preact = torch.ops.ccm_kernels.adapter_activation_backward(grad_hidden, preact, ctx.activation)
        grad_x_conv, grad_w1, grad_b1 = _conv_backward(grad_preact, x, weight1, [needs_x, needs_w1, needs_b1])
        grad_x = grad_out + grad_x_conv if needs_x else None
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


_adapter_residual_op.register_autograd(_backward, setup_context=_setup_context)


# --- public function ---------------------------------------------------------------------------


def _check_inputs(x, weight1, bias1, weight2, bias2, activation) -> None:
    tensors = {"x": x, "weight1": weight1, "bias1": bias1, "weight2": weight2, "bias2": bias2}
    for name, value in tensors.items():
        require_tensor(name, value)
    require_float("x", x)
    for name, value in tensors.items():
        require_same_dtype(name, value, "x", x)
        require_same_device(name, value, "x", x)
    if x.ndim != 4:
        raise KernelShapeError(f"expected x of shape [B, C, H, W], got {tuple(x.shape)}")
    channels = x.shape[1]
    for name, weight in (("weight1", weight1), ("weight2", weight2)):
        if weight.ndim != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
            raise KernelShapeError(f"expected {name} of shape [C_out, C_in, k, k] with odd k, got {tuple(weight.shape)}")
    hidden = weight1.shape[0]
    if weight1.shape[1] != channels:
        raise KernelShapeError(f"expected weight1 of shape [C_hidden, {channels}, k, k] (C of x), got {tuple(weight1.shape)}")
    if weight2.shape[:2] != (channels, hidden):
        raise KernelShapeError(
            f"expected weight2 of shape [{channels}, {hidden}, k, k] (C of x, C_hidden of weight1), got {tuple(weight2.shape)}"
        )
    if bias1.shape != (hidden,):
        raise KernelShapeError(f"expected bias1 of shape ({hidden},), got {tuple(bias1.shape)}")
    if bias2.shape != (channels,):
        raise KernelShapeError(f"expected bias2 of shape ({channels},), got {tuple(bias2.shape)}")
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"expected activation in {ACTIVATIONS}, got {activation!r}")


def adapter_residual_block(
    x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, *, activation: str = "silu"
) -> Tensor:
    """``x + conv2(act(conv1(x) + bias1)) + bias2``: 'same' padding, stride 1, odd square kernels.

    x: [B, C, H, W]; weight1: [C_hidden, C, k, k]; weight2: [C, C_hidden, k, k]; biases [C_hidden], [C];
    one float dtype and device for all. Differentiable w.r.t. x and every weight and bias.
    """
    _check_inputs(x, weight1, bias1, weight2, bias2, activation)
    params = (x, weight1, bias1, weight2, bias2)
    save_preactivation = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    out, _, _ = torch.ops.ccm_kernels.adapter_residual_block(*params, activation, save_preactivation)
    return out
