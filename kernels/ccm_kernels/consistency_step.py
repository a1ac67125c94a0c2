"""Fused consistency step: x0 from the model output, ``c_out * x0 + c_skip * sample``, noise injection.

One pass over memory instead of eager PyTorch's chain of element-wise ops: reads model_output,
sample (and noise), writes denoised (and x_next). Coefficients are per sample ([B], float32), so a
batch may mix timesteps. Arithmetic follows diffusers' ``LCMScheduler.step`` operation for operation
in float32 (IEEE division, no FMA contraction), so the kernel matches the reference to rounding.

Registered as ``torch.ops.ccm_kernels.consistency_step`` (+ ``consistency_step_backward``): the
op dispatches to the Triton kernel or to :mod:`ccm_kernels.reference.consistency_step`.
"""

import functools
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from ._validation import require_float, require_like, require_same_device, require_tensor
from .errors import KernelDTypeError, KernelInputError, KernelShapeError
from .reference.consistency_step import (
    PREDICTION_TYPES,
    consistency_step_backward_reference,
    consistency_step_reference,
)

_PREDICTION_CODES = {name: code for code, name in enumerate(PREDICTION_TYPES)}  # epsilon 0, v 1, sample 2


# --- Triton kernels (built on first use: triton is optional) -----------------------------------


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Define the kernels; ``interpret`` keys the cache since ``triton.jit`` reads TRITON_INTERPRET."""
    import triton
    import triton.language as tl

    @triton.jit
    def _consistency_step_kernel(
        model_output_ptr, sample_ptr, noise_ptr,
        sqrt_alpha_ptr, sqrt_one_minus_alpha_ptr, c_skip_ptr, c_out_ptr,
        sqrt_alpha_next_ptr, sqrt_one_minus_alpha_next_ptr,
        denoised_ptr, x_next_ptr,
        per_sample, clip_range,
        PREDICTION: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # grid = (batch, blocks per sample): coefficients are scalars for the whole program
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < per_sample
        offs = b.to(tl.int64) * per_sample + cols
        s = tl.load(sample_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(model_output_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PREDICTION == 0:
            x0 = tl.math.div_rn(s - tl.load(sqrt_one_minus_alpha_ptr + b) * m, tl.load(sqrt_alpha_ptr + b))
        elif PREDICTION == 1:
            x0 = tl.load(sqrt_alpha_ptr + b) * s - tl.load(sqrt_one_minus_alpha_ptr + b) * m
        else:
            x0 = m
        if HAS_CLIP:  # nested where keeps NaN, as torch.clamp does
            x0 = tl.where(x0 < -clip_range, -clip_range, tl.where(x0 > clip_range, clip_range, x0))
        denoised = tl.load(c_out_ptr + b) * x0 + tl.load(c_skip_ptr + b) * s
        tl.store(denoised_ptr + offs, denoised.to(denoised_ptr.dtype.element_ty), mask=mask)
        if HAS_NOISE:
            z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x_next = tl.load(sqrt_alpha_next_ptr + b) * denoised + tl.load(sqrt_one_minus_alpha_next_ptr + b) * z
            tl.store(x_next_ptr + offs, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _consistency_step_backward_kernel(
        grad_denoised_ptr, grad_x_next_ptr, model_output_ptr, sample_ptr,
        sqrt_alpha_ptr, sqrt_one_minus_alpha_ptr, c_skip_ptr, c_out_ptr,
        sqrt_alpha_next_ptr, sqrt_one_minus_alpha_next_ptr,
        grad_model_output_ptr, grad_sample_ptr, grad_noise_ptr,
        per_sample, clip_range,
        PREDICTION: tl.constexpr, HAS_GRAD_DENOISED: tl.constexpr, HAS_GRAD_X_NEXT: tl.constexpr,
        HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # same order of operations as consistency_step_backward_reference
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < per_sample
        offs = b.to(tl.int64) * per_sample + cols
        if HAS_GRAD_X_NEXT:
            gx = tl.load(grad_x_next_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            through_next = tl.load(sqrt_alpha_next_ptr + b) * gx
            if HAS_GRAD_DENOISED:
                g = tl.load(grad_denoised_ptr + offs, mask=mask, other=0.0).to(tl.float32) + through_next
            else:
                g = through_next
            grad_noise = tl.load(sqrt_one_minus_alpha_next_ptr + b) * gx
            tl.store(grad_noise_ptr + offs, grad_noise.to(grad_noise_ptr.dtype.element_ty), mask=mask)
        else:
            g = tl.load(grad_denoised_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad_x0 = tl.load(c_out_ptr + b) * g
        if HAS_CLIP:
            s = tl.load(sample_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(model_output_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if PREDICTION == 0:
                x0 = tl.math.div_rn(s - tl.load(sqrt_one_minus_alpha_ptr + b) * m, tl.load(sqrt_alpha_ptr + b))
            elif PREDICTION == 1:
                x0 = tl.load(sqrt_alpha_ptr + b) * s - tl.load(sqrt_one_minus_alpha_ptr + b) * m
            else:
                x0 = m
            grad_x0 = tl.where((x0 >= -clip_range) & (x0 <= clip_range), grad_x0, 0.0)
        skip = tl.load(c_skip_ptr + b) * g
        if PREDICTION == 0:
            scaled = tl.math.div_rn(grad_x0, tl.load(sqrt_alpha_ptr + b))
            grad_m = -(tl.load(sqrt_one_minus_alpha_ptr + b) * scaled)
            grad_s = scaled + skip
        elif PREDICTION == 1:
            grad_m = -(tl.load(sqrt_one_minus_alpha_ptr + b) * grad_x0)
            grad_s = tl.load(sqrt_alpha_ptr + b) * grad_x0 + skip
        else:
            grad_m = grad_x0
            grad_s = skip
        tl.store(grad_model_output_ptr + offs, grad_m.to(grad_model_output_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_sample_ptr + offs, grad_s.to(grad_sample_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(forward=_consistency_step_kernel, backward=_consistency_step_backward_kernel)


# --- launchers ---------------------------------------------------------------------------------


def _launch_grid(like: Tensor, what: str) -> tuple[tuple[int, int], int, int, int]:
    """((batch, blocks per sample), per_sample, BLOCK, num_warps) for a [B, ...] tensor."""
    batch = like.shape[0]
    per_sample = like.numel() // batch
    block, num_warps = _backend.block_config(per_sample)
    blocks = -(-per_sample // block)
    _backend.check_grid_y(blocks, what)
    return (batch, blocks), per_sample, block, num_warps


def _contiguous(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    return [None if t is None else t.contiguous() for t in tensors]


def _launch_forward(
    model_output: Tensor,
    sample: Tensor,
    coefficients: list[Tensor],
    noise: Optional[Tensor],
    next_coefficients: list[Optional[Tensor]],
    prediction_type: str,
    clip_sample_range: Optional[float],
) -> tuple[Tensor, Tensor]:
    """Run the forward kernel on validated tensors; x_next is an empty tensor without noise."""
    model_output, sample, noise = _contiguous(model_output, sample, noise)
    coefficients = _contiguous(*coefficients)
    next_coefficients = _contiguous(*next_coefficients)
    denoised = torch.empty_like(sample, memory_format=torch.contiguous_format)
    x_next = torch.empty_like(denoised) if noise is not None else sample.new_empty((0,))
    if sample.numel() == 0:
        return denoised, x_next
    grid, per_sample, block, num_warps = _launch_grid(sample, "consistency_step")
    has_noise = noise is not None
    san, sbn = next_coefficients if has_noise else (coefficients[0], coefficients[1])  # unused pointers
    kernel = _kernels(_backend.interpreter_enabled()).forward
    with _backend.device_guard(sample):
        kernel[grid](
            model_output, sample, noise if has_noise else sample,
            *coefficients, san, sbn,
            denoised, x_next if has_noise else denoised,
            per_sample, float(clip_sample_range or 0.0),
            PREDICTION=_PREDICTION_CODES[prediction_type], HAS_NOISE=has_noise,
            HAS_CLIP=clip_sample_range is not None, BLOCK=block,
            num_warps=num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return denoised, x_next


def _launch_backward(
    grad_denoised: Optional[Tensor],
    grad_x_next: Optional[Tensor],
    model_output: Optional[Tensor],
    sample: Optional[Tensor],
    coefficients: list[Tensor],
    next_coefficients: list[Optional[Tensor]],
    prediction_type: str,
    clip_sample_range: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the backward kernel; grad_noise is an empty tensor when x_next had no gradient."""
    grad_denoised, grad_x_next, model_output, sample = _contiguous(grad_denoised, grad_x_next, model_output, sample)
    coefficients = _contiguous(*coefficients)
    next_coefficients = _contiguous(*next_coefficients)
    like = grad_denoised if grad_denoised is not None else grad_x_next
    grad_model_output, grad_sample = torch.empty_like(like), torch.empty_like(like)
    has_gx = grad_x_next is not None
    grad_noise = torch.empty_like(like) if has_gx else like.new_empty((0,))
    if like.numel() == 0:
        return grad_model_output, grad_sample, grad_noise
    grid, per_sample, block, num_warps = _launch_grid(like, "consistency_step backward")
    san, sbn = next_coefficients if has_gx else (coefficients[0], coefficients[1])  # unused pointers
    has_clip = clip_sample_range is not None
    kernel = _kernels(_backend.interpreter_enabled()).backward
    with _backend.device_guard(like):
        kernel[grid](
            like if grad_denoised is None else grad_denoised, like if grad_x_next is None else grad_x_next,
            model_output if has_clip else like, sample if has_clip else like,
            *coefficients, san, sbn,
            grad_model_output, grad_sample, grad_noise if has_gx else grad_sample,
            per_sample, float(clip_sample_range or 0.0),
            PREDICTION=_PREDICTION_CODES[prediction_type], HAS_GRAD_DENOISED=grad_denoised is not None,
            HAS_GRAD_X_NEXT=has_gx, HAS_CLIP=has_clip, BLOCK=block,
            num_warps=num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return grad_model_output, grad_sample, grad_noise


# --- torch.library registration ----------------------------------------------------------------


@torch.library.custom_op("ccm_kernels::consistency_step", mutates_args=())
def _consistency_step_op(
    model_output: Tensor,
    sample: Tensor,
    sqrt_alpha: Tensor,
    sqrt_one_minus_alpha: Tensor,
    c_skip: Tensor,
    c_out: Tensor,
    noise: Optional[Tensor],
    sqrt_alpha_next: Optional[Tensor],
    sqrt_one_minus_alpha_next: Optional[Tensor],
    prediction_type: str,
    clip_sample_range: Optional[float],
) -> tuple[Tensor, Tensor]:
    """(denoised, x_next); x_next is an empty tensor when ``noise`` is None (schemas have no Optional outputs)."""
    coefficients = [sqrt_alpha, sqrt_one_minus_alpha, c_skip, c_out]
    next_coefficients = [sqrt_alpha_next, sqrt_one_minus_alpha_next]
    if _backend.use_triton(sample):
        return _launch_forward(
            model_output, sample, coefficients, noise, next_coefficients, prediction_type, clip_sample_range
        )
    denoised, x_next = consistency_step_reference(
        model_output, sample, *coefficients, prediction_type=prediction_type, noise=noise,
        sqrt_alpha_next=sqrt_alpha_next, sqrt_one_minus_alpha_next=sqrt_one_minus_alpha_next,
        clip_sample_range=clip_sample_range,
    )  # fmt: skip
    return denoised.contiguous(), (x_next.contiguous() if x_next is not None else sample.new_empty((0,)))


@_consistency_step_op.register_fake
def _(model_output, sample, sqrt_alpha, sqrt_one_minus_alpha, c_skip, c_out, noise, sqrt_alpha_next,
      sqrt_one_minus_alpha_next, prediction_type, clip_sample_range):  # fmt: skip
    denoised = torch.empty_like(sample, memory_format=torch.contiguous_format)
    return denoised, (torch.empty_like(denoised) if noise is not None else sample.new_empty((0,)))


@torch.library.custom_op("ccm_kernels::consistency_step_backward", mutates_args=())
def _consistency_step_backward_op(
    grad_denoised: Optional[Tensor],
    grad_x_next: Optional[Tensor],
    model_output: Optional[Tensor],
    sample: Optional[Tensor],
    sqrt_alpha: Tensor,
    sqrt_one_minus_alpha: Tensor,
    c_skip: Tensor,
    c_out: Tensor,
    sqrt_alpha_next: Optional[Tensor],
    sqrt_one_minus_alpha_next: Optional[Tensor],
    prediction_type: str,
    clip_sample_range: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_model_output, grad_sample, grad_noise); grad_noise is empty when ``grad_x_next`` is None."""
    coefficients = [sqrt_alpha, sqrt_one_minus_alpha, c_skip, c_out]
    next_coefficients = [sqrt_alpha_next, sqrt_one_minus_alpha_next]
    like = grad_denoised if grad_denoised is not None else grad_x_next
    if _backend.use_triton(like):
        return _launch_backward(
            grad_denoised, grad_x_next, model_output, sample, coefficients, next_coefficients,
            prediction_type, clip_sample_range,
        )  # fmt: skip
    grad_m, grad_s, grad_noise = consistency_step_backward_reference(
        grad_denoised, grad_x_next, model_output, sample, *coefficients, *next_coefficients,
        prediction_type=prediction_type, clip_sample_range=clip_sample_range,
    )  # fmt: skip
    grad_noise = grad_noise.contiguous() if grad_noise is not None else like.new_empty((0,))
    return grad_m.contiguous(), grad_s.contiguous(), grad_noise


@_consistency_step_backward_op.register_fake
def _(grad_denoised, grad_x_next, model_output, sample, sqrt_alpha, sqrt_one_minus_alpha, c_skip, c_out,
      sqrt_alpha_next, sqrt_one_minus_alpha_next, prediction_type, clip_sample_range):  # fmt: skip
    like = grad_denoised if grad_denoised is not None else grad_x_next
    grad = torch.empty_like(like, memory_format=torch.contiguous_format)
    grad_noise = torch.empty_like(grad) if grad_x_next is not None else like.new_empty((0,))
    return grad, torch.empty_like(grad), grad_noise


def _setup_context(ctx, inputs, output) -> None:
    (model_output, sample, sa, sb, c_skip, c_out, noise, san, sbn, prediction_type, clip) = inputs
    ctx.prediction_type, ctx.clip_sample_range, ctx.has_noise = prediction_type, clip, noise is not None
    # the inputs themselves are only needed to find clamped entries
    keep = (model_output, sample) if clip is not None else (None, None)
    ctx.save_for_backward(*keep, sa, sb, c_skip, c_out, san, sbn)


def _backward(ctx, grad_denoised: Optional[Tensor], grad_x_next: Optional[Tensor]):
    model_output, sample, sa, sb, c_skip, c_out, san, sbn = ctx.saved_tensors
    if not ctx.has_noise:
        grad_x_next = None  # gradient of the empty placeholder output
    no_grads = (None,) * 11
    if grad_denoised is None and grad_x_next is None:
        return no_grads
    grad_m, grad_s, grad_noise = torch.ops.ccm_kernels.consistency_step_backward(
        grad_denoised, grad_x_next, model_output, sample, sa, sb, c_skip, c_out,
        san if ctx.has_noise else None, sbn if ctx.has_noise else None, ctx.prediction_type, ctx.clip_sample_range,
    )  # fmt: skip
    return (grad_m, grad_s, None, None, None, None, grad_noise if grad_x_next is not None else None) + no_grads[7:]


_consistency_step_op.register_autograd(_backward, setup_context=_setup_context)


# --- public function ---------------------------------------------------------------------------


def _check_coefficient(name: str, value, sample: Tensor) -> Tensor:
    coefficient = require_tensor(name, value)
    if coefficient.dtype != torch.float32:
        raise KernelDTypeError(f"expected {name} of dtype torch.float32, got {coefficient.dtype}")
    if coefficient.shape != (sample.shape[0],):
        raise KernelShapeError(
            f"expected {name} of shape ({sample.shape[0]},) (one value per sample), got {tuple(coefficient.shape)}"
        )
    require_same_device(name, coefficient, "sample", sample)
    if coefficient.requires_grad and torch.is_grad_enabled():
        raise KernelInputError(f"{name} requires grad, but coefficients are constants here; pass {name}.detach()")
    return coefficient


def _check_inputs(model_output, sample, coefficients: dict, noise, next_coefficients: dict, prediction_type, clip):
    require_tensor("sample", sample)
    require_float("sample", sample)
    if sample.ndim < 1:
        raise KernelShapeError("expected sample of shape [B, ...], got a 0-dim tensor")
    require_like("model_output", require_tensor("model_output", model_output), "sample", sample)
    if prediction_type not in PREDICTION_TYPES:
        raise KernelInputError(f"expected prediction_type in {PREDICTION_TYPES}, got {prediction_type!r}")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise KernelInputError(f"expected clip_sample_range None or a number > 0, got {clip!r}")
    for name, value in coefficients.items():
        _check_coefficient(name, value, sample)
    if noise is not None:
        require_like("noise", require_tensor("noise", noise), "sample", sample)
        for name, value in next_coefficients.items():
            if value is None:
                raise KernelInputError(f"noise injection needs {name}, got None")
            _check_coefficient(name, value, sample)


def _reference_directly(model_output: Tensor, sample: Tensor, noise: Optional[Tensor]) -> bool:
    """Whether a call may skip the registered op for the reference itself: the same numbers without
    the custom op's dispatch (about 0.1 ms a call between a sampler's network forwards). Not when a
    gradient is needed or a graph is traced: there the registered op and its backward count."""
    if torch.compiler.is_compiling() or _backend.use_triton(sample):
        return False
    tensors = (model_output, sample, noise)
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def consistency_step(
    model_output: Tensor,
    sample: Tensor,
    sqrt_alpha: Tensor,
    sqrt_one_minus_alpha: Tensor,
    c_skip: Tensor,
    c_out: Tensor,
    *,
    prediction_type: str = "epsilon",
    noise: Optional[Tensor] = None,
    sqrt_alpha_next: Optional[Tensor] = None,
    sqrt_one_minus_alpha_next: Optional[Tensor] = None,
    clip_sample_range: Optional[float] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """One consistency-model step: ``(denoised, x_next)``; ``x_next`` is None without ``noise``.

    ``model_output``, ``sample`` (and ``noise``): [B, ...], one float dtype. Coefficients: float32 [B]
    on the same device. Computes in float32, returns the input dtype. Differentiable w.r.t.
    ``model_output``, ``sample`` and ``noise``; the coefficients are treated as constants.
    """
    _check_inputs(
        model_output, sample,
        {"sqrt_alpha": sqrt_alpha, "sqrt_one_minus_alpha": sqrt_one_minus_alpha, "c_skip": c_skip, "c_out": c_out},
        noise, {"sqrt_alpha_next": sqrt_alpha_next, "sqrt_one_minus_alpha_next": sqrt_one_minus_alpha_next},
        prediction_type, clip_sample_range,
    )  # fmt: skip
    has_noise = noise is not None
    if _reference_directly(model_output, sample, noise):
        denoised, x_next = consistency_step_reference(
            model_output, sample, sqrt_alpha, sqrt_one_minus_alpha, c_skip, c_out, prediction_type=prediction_type,
            noise=noise, sqrt_alpha_next=sqrt_alpha_next if has_noise else None,
            sqrt_one_minus_alpha_next=sqrt_one_minus_alpha_next if has_noise else None,
            clip_sample_range=None if clip_sample_range is None else float(clip_sample_range),
        )  # fmt: skip
        return denoised.contiguous(), (x_next.contiguous() if has_noise else None)
    denoised, x_next = torch.ops.ccm_kernels.consistency_step(
        model_output, sample, sqrt_alpha, sqrt_one_minus_alpha, c_skip, c_out, noise,
        sqrt_alpha_next if has_noise else None, sqrt_one_minus_alpha_next if has_noise else None,
        prediction_type, None if clip_sample_range is None else float(clip_sample_range),
    )  # fmt: skip
    return denoised, (x_next if has_noise else None)
