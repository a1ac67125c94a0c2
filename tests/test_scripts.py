"""The README's main command, ``bash scripts/generate.sh``, end to end: a controlled image, its control
map and a grid, with the embedded world models when they are installed (else the tiny fallback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORLD_MODELS = ROOT / "plugins" / "ccm-world" / "ccm_world" / "models"


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "ccm").exists() or Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="generate.sh runs the project's .venv (made by scripts/setup.sh); these tests run elsewhere")
def test_generate_sh_makes_a_controlled_image_its_control_map_and_a_grid(tmp_path):
    out = tmp_path / "image.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "generate.sh"), "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    world = (WORLD_MODELS / "lcm" / "model_index.json").is_file() and any(
        (WORLD_MODELS / f"{kind}-controlnet-sketch" / "config.json").is_file() for kind in ("cm", "dm")
    )
    if world:
        assert "UNTRAINED" not in done.stderr and "model world:lcm" in done.stdout
    else:
        assert "UNTRAINED" in done.stderr  # the fallback says plainly what it is
    image, control, grid = (Image.open(tmp_path / name) for name in ("image.png", "image_control.png", "image_grid.png"))
    assert image.size == control.size and grid.width > image.width
    assert np.asarray(image.convert("RGB")).std() > 0  # a picture, not a blank


def test_triton_is_a_gpu_extra_and_a_test_dependency_not_a_default_one():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda requirements: {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}  # noqa: E731
    assert "triton" not in names(project["dependencies"])
    assert "triton" in names(project["optional-dependencies"]["gpu"])
    assert "triton" in names(project["optional-dependencies"]["dev"])  # the kernels' interpreter tests
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '-e ".[dev]"' in setup and "CCM_TORCH_INDEX" in setup and '--index-url "$TORCH_INDEX"' in setup


def test_setup_sh_picks_the_torch_index_from_ccm_torch_index(tmp_path):
    """setup.sh run against a stand-in python that records pip's arguments (nothing is installed)."""
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    log = tmp_path / "pip.log"
    (fake / "python").write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n')
    (fake / "python").chmod(0o755)
    env = {**os.environ, "CCM_VENV": str(tmp_path / "venv"), "CCM_TORCH_INDEX": "https://download.pytorch.org/whl/cpu"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert any("--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in call for call in calls)
    assert any(call.endswith("install -e .[dev]") for call in calls)
    env.pop("CCM_TORCH_INDEX")
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert log.read_text().splitlines()[len(calls)].endswith("install torch==2.13.0")  # the index changed: set up again
