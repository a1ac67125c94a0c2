"""Kernel tests. Triton parity tests (marker ``interpreter``) run in a child pytest per module.

``TRITON_INTERPRET`` must be set before triton defines a kernel, and other test modules (diffusers,
torch._dynamo) import triton early, so the parent process never runs the Triton path itself: each
module's ``test_triton_path_under_interpreter`` starts ``pytest <module>`` with
``TRITON_INTERPRET=1 CCM_KERNELS=triton`` and ``CCM_KERNELS_TEST_CHILD=1``; in that child only the
``interpreter`` tests are collected, in the parent they are deselected. To run them directly:

    TRITON_INTERPRET=1 CCM_KERNELS=triton CCM_KERNELS_TEST_CHILD=1 pytest tests/kernels --confcutdir tests/kernels
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD_ENV = "CCM_KERNELS_TEST_CHILD"
HERE = Path(__file__).resolve().parent


def in_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter: Triton-path parity test; runs in a child pytest under TRITON_INTERPRET=1"
    )


def pytest_collection_modifyitems(config, items):
    child, keep, drop = in_child(), [], []
    for item in items:
        ours = HERE in Path(item.path).resolve().parents
        marked = item.get_closest_marker("interpreter") is not None
        (drop if ours and marked != child else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def run_interpreter_child():
    """Run the ``interpreter`` tests of one module in a fresh TRITON_INTERPRET=1 pytest."""
    pytest.importorskip("triton")

    def run(module_file: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", CCM_KERNELS="triton", **{CHILD_ENV: "1"})
        cmd = [sys.executable, "-m", "pytest", module_file, "-q", "-p", "no:cacheprovider", "--confcutdir", str(HERE)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:  # 5 = nothing collected, which is a failure here too
            pytest.fail(f"interpreter parity run failed (exit {proc.returncode}):\n{output[-12000:]}", pytrace=False)
        print(output.strip().splitlines()[-1])

    return run
