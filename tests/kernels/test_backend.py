"""Backend choice: CCM_KERNELS, fallback without triton, launch limits."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import ccm_kernels
from ccm_kernels import KernelConfigError, KernelLaunchError
from ccm_kernels._backend import block_config, check_grid_y, triton_available, use_triton


def test_reference_setting(monkeypatch):
    monkeypatch.setenv("CCM_KERNELS", "reference")
    assert ccm_kernels.kernel_backend() == "reference"
    assert not use_triton(torch.zeros(1))


def test_auto_setting(monkeypatch):
    monkeypatch.setenv("CCM_KERNELS", " Auto ")
    assert ccm_kernels.kernel_backend() == ("triton" if triton_available() else "reference")
    assert not use_triton(torch.zeros(1))  # CPU tensors take the reference under auto
    monkeypatch.delenv("CCM_KERNELS")
    assert not use_triton(torch.zeros(1, device="meta"))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("CCM_KERNELS", "triton")
    assert ccm_kernels.kernel_backend() == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(torch.zeros(1))  # Triton cannot run CPU tensors without its interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.zeros(1))


def test_unknown_setting_raises(monkeypatch):
    monkeypatch.setenv("CCM_KERNELS", "cuda")
    with pytest.raises(KernelConfigError, match=r"expected CCM_KERNELS in \('auto', 'triton', 'reference'\), got 'cuda'"):
        ccm_kernels.kernel_backend()


def test_launch_limit_fails_loudly():
    check_grid_y(65535, "op")
    with pytest.raises(KernelLaunchError, match="needs 65536 blocks on grid axis 1"):
        check_grid_y(65536, "op")


def test_block_config_is_a_power_of_two(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert block_config(1) == (128, 1)
    assert block_config(300) == (512, 2)
    assert block_config(10**6) == (1024, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert block_config(300)[0] == 512 and block_config(10**7)[0] == 1 << 16


BLOCKED_TRITON = textwrap.dedent(
    """
    import os, sys
    sys.modules["triton"] = None  # "import triton" now raises ImportError
    import torch
    import ccm_kernels
    from ccm_kernels import TritonUnavailableError, adapter_residual_block, consistency_step

    assert ccm_kernels.kernel_backend() == "reference"
    m, s = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4)
    ones = torch.ones(2)
    denoised, _ = consistency_step(m, s, ones, ones * 0.5, ones * 0.1, ones * 0.9, clip_sample_range=1.0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    w1, b1, w2, b2 = torch.randn(5, 3, 3, 3), torch.zeros(5), torch.randn(3, 5, 3, 3), torch.zeros(3)
    (denoised.sum() + adapter_residual_block(x, w1, b1, w2, b2).sum()).backward()
    assert m.grad is not None and x.grad is not None

    os.environ["CCM_KERNELS"] = "triton"
    for call in (ccm_kernels.kernel_backend, lambda: consistency_step(m, s, ones, ones, ones, ones)):
        try:
            call()
        except TritonUnavailableError as exc:
            assert "CCM_KERNELS=triton was requested but triton cannot be imported" in str(exc), exc
        else:
            raise AssertionError("expected TritonUnavailableError")
    print("OK")
    """
)


def test_works_without_triton():
    proc = subprocess.run([sys.executable, "-c", BLOCKED_TRITON], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
