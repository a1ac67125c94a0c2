"""Two CPU processes (torchrun, gloo): both ranks really run and end with identical weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ccm_sdk.training.config import dump_config


@pytest.mark.slow
def test_two_processes_train_the_same_weights(make_config, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun (from torch) is not on PATH"
    config = make_config("ct_controlnet", output_dir=str(tmp_path / "ddp"), train__max_steps=4, train__batch_size=1, checkpoint__every=2)
    config_file = dump_config(config, tmp_path / "ddp.yaml")
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "ccm_sdk.training", "ct_controlnet", "--config", str(config_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # each process wrote its own RNG state; the checkpoint records the world size it needs
    last = tmp_path / "ddp" / "checkpoints" / "step-00000004"
    assert {p.name for p in last.glob("rng-rank*")} == {f"rng-rank{r}.{ext}" for r in (0, 1) for ext in ("json", "safetensors")}
    assert json.loads((last / "state.json").read_text())["world_size"] == 2
    assert load_file(str(tmp_path / "ddp" / "controlnet" / "diffusion_pytorch_model.safetensors"))
