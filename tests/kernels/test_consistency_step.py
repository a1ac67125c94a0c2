"""consistency_step: Triton parity (child, interpreter), diffusers parity, autograd, errors, opcheck."""

from __future__ import annotations

import importlib

import pytest
import torch

import ccm_kernels
from ccm_kernels import KernelDeviceError, KernelDTypeError, KernelInputError, KernelShapeError, consistency_step
from ccm_kernels._backend import use_triton
from ccm_kernels.reference import PREDICTION_TYPES, consistency_step_reference

# Triton path vs reference: (atol, rtol). float32 must agree to diffusers' 1e-6; the interpreter
# rounds float32 -> bfloat16 by truncation (the GPU rounds to nearest), so bfloat16 allows 1-2 ulp.
TOLERANCES = {
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
SHAPES = [(3, 4, 7, 9), (1, 4, 5, 13), (2, 3, 1, 1)]
VARIANTS = ["plain", "noise", "clip", "noise+clip"]


def make_inputs(shape, dtype=torch.float32, *, variant="noise+clip", seed=0):
    """Random tensors and per-sample coefficients (every sample its own timestep)."""
    g = torch.Generator().manual_seed(seed)
    batch = shape[0]
    model_output = (torch.randn(shape, generator=g) * 1.5).to(dtype)
    sample = (torch.randn(shape, generator=g) * 2.0).to(dtype)
    alpha = torch.rand(batch, generator=g) * 0.9 + 0.05
    c_skip = torch.rand(batch, generator=g)
    coefficients = [alpha.sqrt(), (1 - alpha).sqrt(), c_skip, (1 - c_skip**2).sqrt()]
    kwargs = {}
    if "noise" in variant:
        alpha_next = torch.rand(batch, generator=g) * 0.9 + 0.05
        kwargs.update(
            noise=torch.randn(shape, generator=g).to(dtype),
            sqrt_alpha_next=alpha_next.sqrt(),
            sqrt_one_minus_alpha_next=(1 - alpha_next).sqrt(),
        )
    if "clip" in variant:
        kwargs["clip_sample_range"] = 1.0
    return model_output, sample, coefficients, kwargs


def run_with_grads(fn, model_output, sample, coefficients, kwargs, seed=1):
    """Outputs of ``fn`` and the gradients of a fixed random projection w.r.t. (model_output, sample, noise)."""
    leaves = [model_output.clone().requires_grad_(), sample.clone().requires_grad_()]
    kwargs = dict(kwargs)
    if "noise" in kwargs:
        kwargs["noise"] = kwargs["noise"].clone().requires_grad_()
        leaves.append(kwargs["noise"])
    denoised, x_next = fn(leaves[0], leaves[1], *coefficients, **kwargs)
    g = torch.Generator().manual_seed(seed)
    outputs = [denoised] + ([x_next] if x_next is not None else [])
    grads = [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outputs]
    torch.autograd.backward(outputs, grads)
    return outputs, [leaf.grad for leaf in leaves]


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# --- Triton path under the interpreter (child process) -----------------------------------------


def test_triton_path_under_interpreter(run_interpreter_child):
    run_interpreter_child(__file__)


@pytest.mark.interpreter
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype, prediction_type, variant):
    m, s, coefficients, kwargs = make_inputs(shape, dtype, variant=variant)
    assert ccm_kernels.kernel_backend() == "triton" and use_triton(s)
    kwargs["prediction_type"] = prediction_type
    outs, grads = run_with_grads(consistency_step, m, s, coefficients, kwargs)
    ref_outs, ref_grads = run_with_grads(consistency_step_reference, m, s, coefficients, kwargs)
    for actual, expected in zip(outs + grads, ref_outs + ref_grads, strict=True):
        assert_close(actual, expected, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["transposed", "one_dim"])
def test_triton_non_contiguous_and_one_dim(layout):
    m, s, coefficients, kwargs = make_inputs((4, 6, 5))
    if layout == "transposed":
        m, s, kwargs["noise"] = (t.transpose(1, 2) for t in (m, s, kwargs["noise"]))
    else:  # [B]: one element per sample
        m, s, kwargs["noise"] = (t[:, 0, 0].contiguous() for t in (m, s, kwargs["noise"]))
    outs, grads = run_with_grads(consistency_step, m, s, coefficients, kwargs)
    ref_outs, ref_grads = run_with_grads(consistency_step_reference, m, s, coefficients, kwargs)
    for actual, expected in zip(outs + grads, ref_outs + ref_grads, strict=True):
        assert_close(actual, expected, torch.float32)


@pytest.mark.interpreter
def test_triton_only_denoised_gets_a_gradient():
    m, s, coefficients, kwargs = make_inputs((2, 3, 4, 5))
    for use in ("denoised", "x_next"):
        leaves = [m.clone().requires_grad_(), s.clone().requires_grad_()]
        ref_leaves = [m.clone().requires_grad_(), s.clone().requires_grad_()]
        out = consistency_step(*leaves, *coefficients, **kwargs)
        ref = consistency_step_reference(*ref_leaves, *coefficients, **kwargs)
        pick = 0 if use == "denoised" else 1
        (out[pick] ** 2).sum().backward()
        (ref[pick] ** 2).sum().backward()
        for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
            assert_close(leaf.grad, ref_leaf.grad, torch.float32)


@pytest.mark.interpreter
def test_triton_empty_inputs():
    for shape in [(0, 4, 3, 3), (2, 0, 5)]:
        m, s, coefficients, kwargs = make_inputs(shape)
        denoised, x_next = consistency_step(m, s, *coefficients, **kwargs)
        assert denoised.shape == x_next.shape == shape


# --- compiled Triton kernels on a GPU (skipped without one) ------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["plain", "noise+clip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_cuda_triton_matches_reference(dtype, prediction_type, variant, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("CCM_KERNELS", "triton")
    m, s, coefficients, kwargs = make_inputs((3, 4, 7, 9), dtype, variant=variant)
    m, s, coefficients = m.cuda(), s.cuda(), [c.cuda() for c in coefficients]
    kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    kwargs["prediction_type"] = prediction_type
    assert use_triton(s)
    outs, grads = run_with_grads(consistency_step, m, s, coefficients, kwargs)
    ref_outs, ref_grads = run_with_grads(consistency_step_reference, m, s, coefficients, kwargs)
    for actual, expected in zip(outs + grads, ref_outs + ref_grads, strict=True):
        assert_close(actual, expected, dtype)


# --- reference against diffusers' LCMScheduler.step --------------------------------------------


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_reference_matches_lcm_scheduler(prediction_type, clip):
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(prediction_type=prediction_type, clip_sample=clip, clip_sample_range=1.0)
    scheduler.set_timesteps(4)
    shape, batch = (2, 4, 8, 8), 2
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = sample.clone()
    for i, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        step = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(200 + i))
        # our side: the same formulas fed per-sample coefficients, the noise drawn from the same state
        alpha = scheduler.alphas_cumprod[t]
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        per_sample = lambda v: torch.as_tensor(v, dtype=torch.float32).expand(batch).contiguous()  # noqa: E731
        kwargs = {"prediction_type": prediction_type, "clip_sample_range": 1.0 if clip else None}
        if i < len(scheduler.timesteps) - 1:
            t_prev = scheduler.timesteps[i + 1]
            alpha_prev = scheduler.alphas_cumprod[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod
            kwargs.update(
                noise=torch.randn(shape, generator=torch.Generator().manual_seed(200 + i)),
                sqrt_alpha_next=per_sample(alpha_prev.sqrt()),
                sqrt_one_minus_alpha_next=per_sample((1 - alpha_prev).sqrt()),
            )
        coefficients = [per_sample(alpha.sqrt()), per_sample((1 - alpha).sqrt()), per_sample(c_skip), per_sample(c_out)]
        denoised, x_next = consistency_step_reference(model_output, x, *coefficients, **kwargs)
        torch.testing.assert_close(denoised, step.denoised, atol=1e-6, rtol=1e-6)
        x_op = consistency_step(model_output, x, *coefficients, **kwargs)  # the public op, CPU: reference
        x = x_next if x_next is not None else denoised
        torch.testing.assert_close(x, step.prev_sample, atol=1e-6, rtol=1e-6)
        assert torch.equal(x_op[0], denoised) and (x_next is None or torch.equal(x_op[1], x_next))
        sample = step.prev_sample


def test_per_sample_timesteps_match_separate_calls():
    m, s, coefficients, kwargs = make_inputs((3, 4, 5, 6))
    batched = consistency_step(m, s, *coefficients, **kwargs)
    for b in range(3):
        one = consistency_step(
            m[b : b + 1], s[b : b + 1], *(c[b : b + 1] for c in coefficients),
            noise=kwargs["noise"][b : b + 1], sqrt_alpha_next=kwargs["sqrt_alpha_next"][b : b + 1],
            sqrt_one_minus_alpha_next=kwargs["sqrt_one_minus_alpha_next"][b : b + 1], clip_sample_range=1.0,
        )  # fmt: skip
        for whole, part in zip(batched, one, strict=True):
            assert torch.equal(whole[b : b + 1], part)


# --- the registered op on the reference path ---------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_op_backward_matches_autograd_of_reference(prediction_type, variant, monkeypatch):
    monkeypatch.setenv("CCM_KERNELS", "reference")
    m, s, coefficients, kwargs = make_inputs((3, 4, 7, 9), variant=variant)
    kwargs["prediction_type"] = prediction_type
    outs, grads = run_with_grads(consistency_step, m, s, coefficients, kwargs)
    ref_outs, ref_grads = run_with_grads(consistency_step_reference, m, s, coefficients, kwargs)
    for actual, expected in zip(outs + grads, ref_outs + ref_grads, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_calls_skip_the_registered_op_with_the_same_numbers(variant, monkeypatch):
    consistency_module = importlib.import_module("ccm_kernels.consistency_step")
    m, s, coefficients, kwargs = make_inputs((2, 4, 5, 3), variant=variant)
    calls = []
    real_op = consistency_module._consistency_step_op
    monkeypatch.setattr(torch.ops.ccm_kernels, "consistency_step", lambda *a: calls.append(a) or real_op(*a))
    with torch.no_grad():
        direct = consistency_step(m, s, *coefficients, **kwargs)
    assert calls == []  # no gradient wanted: the reference runs without the op's dispatch
    monkeypatch.setattr(consistency_module, "_reference_directly", lambda *_: False)
    with torch.no_grad():
        through_op = consistency_step(m, s, *coefficients, **kwargs)
    assert len(calls) == 1
    for a, b in zip(direct, through_op, strict=True):
        assert (a is None and b is None) or (torch.equal(a, b) and a.is_contiguous())


def test_gradients_still_go_through_the_registered_op(monkeypatch):
    consistency_module = importlib.import_module("ccm_kernels.consistency_step")
    m, s, coefficients, kwargs = make_inputs((2, 3, 4))
    m.requires_grad_()
    assert not consistency_module._reference_directly(m, s, kwargs["noise"])
    denoised, x_next = consistency_step(m, s, *coefficients, **kwargs)
    assert denoised.grad_fn is not None and "ccm_kernels_consistency_step" in type(denoised.grad_fn).__name__


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_compute_in_float32(dtype):
    m, s, coefficients, kwargs = make_inputs((2, 3, 4, 4), dtype)
    denoised, x_next = consistency_step(m, s, *coefficients, **kwargs)
    assert denoised.dtype == x_next.dtype == dtype
    ref32 = consistency_step_reference(m.float(), s.float(), *coefficients, **dict(kwargs, noise=kwargs["noise"].float()))
    assert torch.equal(denoised, ref32[0].to(dtype)) and torch.equal(x_next, ref32[1].to(dtype))


def test_empty_and_non_contiguous_inputs():
    m, s, coefficients, kwargs = make_inputs((0, 4, 3, 3))
    denoised, x_next = consistency_step(m, s, *coefficients, **kwargs)
    assert denoised.shape == x_next.shape == (0, 4, 3, 3)
    m, s, coefficients, _ = make_inputs((3, 5, 4))
    out, none = consistency_step(m.transpose(1, 2), s.transpose(1, 2), *coefficients)
    assert none is None and out.is_contiguous()
    assert torch.equal(out, consistency_step_reference(m.transpose(1, 2), s.transpose(1, 2), *coefficients)[0])


def test_opcheck():
    m, s, coefficients, kwargs = make_inputs((2, 3, 4, 5))
    m.requires_grad_()
    s.requires_grad_()
    op = torch.ops.ccm_kernels.consistency_step.default
    for prediction_type in PREDICTION_TYPES:
        torch.library.opcheck(op, (m, s, *coefficients, None, None, None, prediction_type, None))
    torch.library.opcheck(
        op, (m, s, *coefficients, kwargs["noise"], kwargs["sqrt_alpha_next"], kwargs["sqrt_one_minus_alpha_next"], "epsilon", 1.0)
    )
    grad = torch.randn(m.shape)
    backward = torch.ops.ccm_kernels.consistency_step_backward.default
    next_coefficients = [kwargs["sqrt_alpha_next"], kwargs["sqrt_one_minus_alpha_next"]]
    torch.library.opcheck(backward, (grad, grad, m.detach(), s.detach(), *coefficients, *next_coefficients, "v_prediction", 1.0))
    torch.library.opcheck(backward, (grad, None, None, None, *coefficients, None, None, "epsilon", None))


def test_torch_compile_fullgraph_matches_eager():
    m, s, coefficients, kwargs = make_inputs((2, 3, 4, 5), variant="noise+clip")

    def loss(m, s):
        denoised, x_next = consistency_step(m, s, *coefficients, prediction_type="v_prediction", **kwargs)
        return (denoised * x_next).sum()

    # aot_eager traces the op through dynamo, the fake kernel and AOT autograd in well under a
    # second; inductor's C++ codegen takes ~15 s on a 2-core CPU, too slow for a unit test
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaves = [m.clone().requires_grad_(), s.clone().requires_grad_()]
    ref_leaves = [m.clone().requires_grad_(), s.clone().requires_grad_()]
    compiled(*leaves).backward()
    loss(*ref_leaves).backward()
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(leaf.grad, ref_leaf.grad)


# --- bad inputs --------------------------------------------------------------------------------


def _call(**overrides):
    m, s, (sa, sb, c_skip, c_out), kwargs = make_inputs((2, 3, 4, 4))
    args = {"model_output": m, "sample": s, "sqrt_alpha": sa, "sqrt_one_minus_alpha": sb, "c_skip": c_skip, "c_out": c_out}
    args.update(kwargs)
    args.update(overrides)
    positional = [args.pop(k) for k in ("model_output", "sample", "sqrt_alpha", "sqrt_one_minus_alpha", "c_skip", "c_out")]
    return consistency_step(*positional, **args)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"model_output": torch.randn(2, 3, 4, 5)}, KernelShapeError, "expected model_output of shape (2, 3, 4, 4)"),
        ({"model_output": torch.randn(2, 3, 4, 4).half()}, KernelDTypeError, "expected model_output of dtype torch.float32"),
        ({"sample": torch.ones(2, 3, 4, 4, dtype=torch.int64)}, KernelDTypeError, "got torch.int64"),
        ({"sample": torch.tensor(1.0)}, KernelShapeError, "0-dim"),
        ({"sample": [1.0, 2.0]}, KernelDTypeError, "got list"),
        ({"c_skip": torch.ones(3)}, KernelShapeError, "expected c_skip of shape (2,) (one value per sample), got (3,)"),
        ({"c_out": torch.ones(2, 1)}, KernelShapeError, "expected c_out of shape (2,)"),
        ({"sqrt_alpha": torch.ones(2, dtype=torch.float64)}, KernelDTypeError, "expected sqrt_alpha of dtype torch.float32"),
        ({"sqrt_alpha": torch.ones(2, device="meta")}, KernelDeviceError, "expected sqrt_alpha on cpu"),
        ({"c_skip": torch.ones(2, requires_grad=True)}, KernelInputError, "coefficients are constants"),
        ({"noise": torch.randn(2, 3, 4)}, KernelShapeError, "expected noise of shape"),
        ({"sqrt_alpha_next": None}, KernelInputError, "noise injection needs sqrt_alpha_next"),
        ({"sqrt_one_minus_alpha_next": torch.ones(5)}, KernelShapeError, "sqrt_one_minus_alpha_next of shape (2,)"),
        ({"prediction_type": "x0"}, KernelInputError, "expected prediction_type in"),
        ({"clip_sample_range": -1.0}, KernelInputError, "expected clip_sample_range"),
        ({"clip_sample_range": True}, KernelInputError, "expected clip_sample_range"),
    ],
)
def test_bad_inputs_raise(overrides, error, message):
    with pytest.raises(error) as info:
        _call(**overrides)
    assert message in str(info.value)


def test_errors_subclass_builtins():
    assert issubclass(KernelShapeError, ValueError) and issubclass(KernelDTypeError, TypeError)
    assert issubclass(ccm_kernels.TritonUnavailableError, RuntimeError)
