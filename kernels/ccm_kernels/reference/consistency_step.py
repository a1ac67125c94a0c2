"""Reference consistency step: x0 from the model output, the c_skip/c_out blend, optional noise.

Operation for operation what diffusers' ``LCMScheduler.step`` does (steps 4-7), with per-sample
coefficients, computed in float32 and stored in the input dtype.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a [B] coefficient to broadcast over ``like`` ([B, ...])."""
    return coefficient.to(torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def predicted_x0(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sqrt_alpha: torch.Tensor,
    sqrt_one_minus_alpha: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """x0 in float32 from float32 ``model_output`` and ``sample`` (unclipped)."""
    if prediction_type == "epsilon":
        return (sample - _per_sample(sqrt_one_minus_alpha, sample) * model_output) / _per_sample(sqrt_alpha, sample)
    if prediction_type == "v_prediction":
        return _per_sample(sqrt_alpha, sample) * sample - _per_sample(sqrt_one_minus_alpha, sample) * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"expected prediction_type in {PREDICTION_TYPES}, got {prediction_type!r}")


def consistency_step_reference(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sqrt_alpha: torch.Tensor,
    sqrt_one_minus_alpha: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    noise: torch.Tensor | None = None,
    sqrt_alpha_next: torch.Tensor | None = None,
    sqrt_one_minus_alpha_next: torch.Tensor | None = None,
    clip_sample_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(denoised, x_next or None); differentiable through ordinary autograd."""
    dtype = sample.dtype
    m, s = model_output.to(torch.float32), sample.to(torch.float32)
    x0 = predicted_x0(m, s, sqrt_alpha, sqrt_one_minus_alpha, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    denoised = _per_sample(c_out, s) * x0 + _per_sample(c_skip, s) * s
    x_next = None
    if noise is not None:
        x_next = (
            _per_sample(sqrt_alpha_next, s) * denoised
            + _per_sample(sqrt_one_minus_alpha_next, s) * noise.to(torch.float32)
        ).to(dtype)
    return denoised.to(dtype), x_next


def consistency_step_backward_reference(
    grad_denoised: torch.Tensor | None,
    grad_x_next: torch.Tensor | None,
    model_output: torch.Tensor | None,
    sample: torch.Tensor | None,
    sqrt_alpha: torch.Tensor,
    sqrt_one_minus_alpha: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    sqrt_alpha_next: torch.Tensor | None,
    sqrt_one_minus_alpha_next: torch.Tensor | None,
    *,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad_model_output, grad_sample, grad_noise or None) of :func:`consistency_step_reference`.

    Coefficients are constants. ``model_output`` and ``sample`` are only read with a clip range
    (to find the clamped entries). The Triton backward kernel follows these operations in order.
    """
    like = grad_denoised if grad_denoised is not None else grad_x_next
    dtype = like.dtype
    g = grad_denoised.to(torch.float32) if grad_denoised is not None else None
    if grad_x_next is not None:
        through_next = _per_sample(sqrt_alpha_next, like) * grad_x_next.to(torch.float32)
        g = through_next if g is None else g + through_next
    grad_x0 = _per_sample(c_out, like) * g
    if clip_sample_range is not None:
        x0 = predicted_x0(
            model_output.to(torch.float32), sample.to(torch.float32), sqrt_alpha, sqrt_one_minus_alpha, prediction_type
        )
        inside = (x0 >= -clip_sample_range) & (x0 <= clip_sample_range)
        grad_x0 = torch.where(inside, grad_x0, torch.zeros_like(grad_x0))
    skip = _per_sample(c_skip, like) * g
    if prediction_type == "epsilon":
        scaled = grad_x0 / _per_sample(sqrt_alpha, like)
        grad_model_output = -(_per_sample(sqrt_one_minus_alpha, like) * scaled)
        grad_sample = scaled + skip
    elif prediction_type == "v_prediction":
        grad_model_output = -(_per_sample(sqrt_one_minus_alpha, like) * grad_x0)
        grad_sample = _per_sample(sqrt_alpha, like) * grad_x0 + skip
    elif prediction_type == "sample":
        grad_model_output = grad_x0
        grad_sample = skip
    else:
        raise ValueError(f"expected prediction_type in {PREDICTION_TYPES}, got {prediction_type!r}")
    grad_noise = None
    if grad_x_next is not None:
        grad_noise = (_per_sample(sqrt_one_minus_alpha_next, like) * grad_x_next.to(torch.float32)).to(dtype)
    return grad_model_output.to(dtype), grad_sample.to(dtype), grad_noise
