"""adapter_residual_block: Triton parity (child, interpreter), autograd, errors, opcheck, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ccm_kernels
from ccm_kernels import KernelDeviceError, KernelDTypeError, KernelInputError, KernelShapeError, adapter_residual_block
from ccm_kernels._backend import use_triton
from ccm_kernels.reference import ACTIVATIONS, activation_backward_reference, adapter_residual_block_reference

# Triton path vs reference, relative to the largest magnitude of the expected tensor (gradients
# of weights sum over B*H*W positions, so a per-element rtol would be meaningless near zero).
# The interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest): bfloat16 is looser.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
# (x shape, hidden channels, kernel size)
CASES = [((3, 4, 7, 9), 6, 3), ((1, 4, 5, 13), 8, 1), ((2, 3, 1, 1), 5, 5)]


def make_params(shape, hidden, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = shape[1]
    scale1, scale2 = (channels * k * k) ** -0.5, (hidden * k * k) ** -0.5
    params = [
        torch.randn(shape, generator=g),
        torch.randn(hidden, channels, k, k, generator=g) * scale1,
        torch.randn(hidden, generator=g) * 0.5,
        torch.randn(channels, hidden, k, k, generator=g) * scale2,
        torch.randn(channels, generator=g) * 0.5,
    ]
    return [p.to(dtype) for p in params]


def run_with_grads(fn, params, activation, requires_grad=(True,) * 5, seed=1):
    leaves = [p.clone().requires_grad_(r) for p, r in zip(params, requires_grad, strict=True)]
    out = fn(*leaves, activation=activation)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device=out.device, dtype=out.dtype))
    return out, [leaf.grad for leaf in leaves]


def assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.float().abs().max().item() or 1.0
    tol = TOLERANCES[dtype] * scale
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=0)


# --- Triton path under the interpreter (child process) -----------------------------------------


def test_triton_path_under_interpreter(run_interpreter_child):
    run_interpreter_child(__file__)


@pytest.mark.interpreter
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize(("shape", "hidden", "k"), CASES, ids=str)
def test_triton_matches_reference(shape, hidden, k, dtype, activation):
    params = make_params(shape, hidden, k, dtype)
    assert ccm_kernels.kernel_backend() == "triton" and use_triton(params[0])
    out, grads = run_with_grads(adapter_residual_block, params, activation)
    ref_out, ref_grads = run_with_grads(adapter_residual_block_reference, params, activation)
    for actual, expected in zip([out, *grads], [ref_out, *ref_grads], strict=True):
        assert_close(actual, expected, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("requires_grad", [(False, True, True, True, True), (True, False, False, False, False)])
def test_triton_partial_gradients(requires_grad):
    """Adapter training: x comes from a frozen ControlNet; or only x needs a gradient."""
    params = make_params((2, 4, 6, 5), 8, 3)
    out, grads = run_with_grads(adapter_residual_block, params, "silu", requires_grad)
    ref_out, ref_grads = run_with_grads(adapter_residual_block_reference, params, "silu", requires_grad)
    assert_close(out, ref_out, torch.float32)
    for grad, ref_grad, needed in zip(grads, ref_grads, requires_grad, strict=True):
        assert (grad is None) == (not needed)
        if needed:
            assert_close(grad, ref_grad, torch.float32)


@pytest.mark.interpreter
def test_triton_inference_non_contiguous_and_empty():
    params = make_params((2, 4, 6, 5), 8, 3)
    x_channels_last = params[0].to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = adapter_residual_block(x_channels_last, *params[1:], activation="gelu")
    assert_close(out, adapter_residual_block_reference(*params, activation="gelu"), torch.float32)
    empty = make_params((0, 4, 6, 5), 8, 3)
    assert adapter_residual_block(*empty).shape == (0, 4, 6, 5)


@pytest.mark.interpreter
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_activation_backward_op(activation):
    g = torch.Generator().manual_seed(0)
    grad, preact = torch.randn(2, 5, 7, 3, generator=g), torch.randn(2, 5, 7, 3, generator=g) * 3
    preact[0, 0, 0, :2] = 0.0  # relu's kink: torch's threshold_backward passes no gradient at 0
    out = torch.ops.ccm_kernels.adapter_activation_backward(grad, preact, activation)
    assert_close(out, activation_backward_reference(grad, preact, activation), torch.float32)


# --- compiled Triton kernels on a GPU (skipped without one) ------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_cuda_triton_matches_reference(dtype, activation, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("CCM_KERNELS", "triton")
    params = [p.cuda() for p in make_params((3, 4, 7, 9), 6, 3, dtype)]
    assert use_triton(params[0])
    out, grads = run_with_grads(adapter_residual_block, params, activation)
    ref_out, ref_grads = run_with_grads(adapter_residual_block_reference, params, activation)
    for actual, expected in zip([out, *grads], [ref_out, *ref_grads], strict=True):
        assert_close(actual, expected, dtype)


# --- the registered op on the reference path ---------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_op_backward_matches_autograd_of_reference(activation, monkeypatch):
    monkeypatch.setenv("CCM_KERNELS", "reference")
    params = make_params((3, 4, 7, 9), 6, 3)
    out, grads = run_with_grads(adapter_residual_block, params, activation)
    ref_out, ref_grads = run_with_grads(adapter_residual_block_reference, params, activation)
    assert torch.equal(out, ref_out)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, torch.float32)


def test_reference_is_the_adapter_formula():
    x, w1, b1, w2, b2 = make_params((2, 4, 6, 6), 8, 3)
    expected = x + F.conv2d(F.silu(F.conv2d(x, w1, b1, padding=1)), w2, b2, padding=1)
    torch.testing.assert_close(adapter_residual_block(x, w1, b1, w2, b2), expected, atol=1e-5, rtol=1e-5)


def test_backward_without_saved_preactivation_recomputes_it():
    params = make_params((2, 4, 5, 5), 6, 3)
    leaves = [p.clone().requires_grad_() for p in params]
    out, _, preact = torch.ops.ccm_kernels.adapter_residual_block(*leaves, "gelu", False)
    assert preact.numel() == 0
    out.sum().backward()
    ref_leaves = [p.clone().requires_grad_() for p in params]
    adapter_residual_block_reference(*ref_leaves, activation="gelu").sum().backward()
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert_close(leaf.grad, ref_leaf.grad, torch.float32)


def test_opcheck():
    params = [p.requires_grad_() for p in make_params((2, 3, 5, 4), 6, 3)]
    op = torch.ops.ccm_kernels.adapter_residual_block.default
    for activation in ACTIVATIONS:
        torch.library.opcheck(op, (*params, activation, True))
    torch.library.opcheck(op, (*params, "silu", False))
    grad, preact = torch.randn(2, 6, 5, 4), torch.randn(2, 6, 5, 4)
    torch.library.opcheck(torch.ops.ccm_kernels.adapter_activation_backward.default, (grad, preact, "gelu"))


def test_torch_compile_fullgraph_matches_eager():
    params = make_params((2, 3, 5, 4), 6, 3)

    def loss(*params):
        return adapter_residual_block(*params, activation="gelu").square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)  # see test_consistency_step
    leaves = [p.clone().requires_grad_() for p in params]
    ref_leaves = [p.clone().requires_grad_() for p in params]
    compiled(*leaves).backward()
    loss(*ref_leaves).backward()
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(leaf.grad, ref_leaf.grad)


# --- bad inputs --------------------------------------------------------------------------------


def _call(**overrides):
    x, w1, b1, w2, b2 = make_params((2, 4, 5, 5), 6, 3)
    args = {"x": x, "weight1": w1, "bias1": b1, "weight2": w2, "bias2": b2, "activation": "silu"}
    args.update(overrides)
    activation = args.pop("activation")
    return adapter_residual_block(*args.values(), activation=activation)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"x": torch.randn(4, 5, 5)}, KernelShapeError, "expected x of shape [B, C, H, W], got (4, 5, 5)"),
        ({"x": torch.randn(2, 3, 5, 5)}, KernelShapeError, "expected weight1 of shape [C_hidden, 3, k, k]"),
        ({"weight1": torch.randn(6, 4, 2, 2)}, KernelShapeError, "with odd k, got (6, 4, 2, 2)"),
        ({"weight1": torch.randn(6, 4, 3, 1)}, KernelShapeError, "with odd k"),
        ({"weight2": torch.randn(4, 5, 3, 3)}, KernelShapeError, "expected weight2 of shape [4, 6, k, k]"),
        ({"bias1": torch.randn(4)}, KernelShapeError, "expected bias1 of shape (6,), got (4,)"),
        ({"bias2": torch.randn(6)}, KernelShapeError, "expected bias2 of shape (4,), got (6,)"),
        ({"bias2": torch.randn(4).half()}, KernelDTypeError, "expected bias2 of dtype torch.float32"),
        ({"x": torch.ones(2, 4, 5, 5, dtype=torch.int32)}, KernelDTypeError, "got torch.int32"),
        ({"weight2": "w"}, KernelDTypeError, "expected weight2 to be a torch.Tensor, got str"),
        ({"bias1": torch.randn(6, device="meta")}, KernelDeviceError, "expected bias1 on cpu"),
        ({"activation": "tanh"}, KernelInputError, "expected activation in ('silu', 'gelu', 'relu'), got 'tanh'"),
    ],
)
def test_bad_inputs_raise(overrides, error, message):
    with pytest.raises(error) as info:
        _call(**overrides)
    assert message in str(info.value)
