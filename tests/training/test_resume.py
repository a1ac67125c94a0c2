"""Resuming: a run killed with SIGKILL mid-training and resumed ends with the same weights as
an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ccm_sdk.training.checkpoint import list_checkpoints
from ccm_sdk.training.config import dump_config
from ccm_sdk.training.ct_controlnet import CTControlNetTrainer

STEPS = 40


def _launch(config_file, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "ccm_sdk.training", "ct_controlnet", "--config", str(config_file), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(make_config, tmp_path):
    common = dict(train__max_steps=STEPS, train__lr=1e-3, checkpoint__every=2, checkpoint__keep_last=2)
    # 1. the reference, uninterrupted
    reference = CTControlNetTrainer(make_config("ct_controlnet", output_dir=str(tmp_path / "reference"), **common)).train()
    # 2. the same run in a process killed right after its fourth-step checkpoint
    config = make_config("ct_controlnet", output_dir=str(tmp_path / "killed"), **common)
    config_file = dump_config(config, tmp_path / "killed.yaml")
    checkpoints = tmp_path / "killed" / "checkpoints"
    process = _launch(config_file)
    deadline = time.monotonic() + 120
    while not any(step >= 4 for step, _ in list_checkpoints(checkpoints)):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(checkpoints)[-1][0]
    assert killed_at < STEPS and not (tmp_path / "killed" / "controlnet").exists()
    # 3. resume to the end
    process = _launch(config_file, "--resume")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    ours = load_file(str(tmp_path / "killed" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    theirs = load_file(str(reference.outputs["controlnet"] / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"resumed from step {killed_at}: {len(different)} tensors differ, e.g. {different[:3]}"
    history = (tmp_path / "killed" / "loss.csv").read_text().splitlines()
    assert len(history) == STEPS + 1 and history == (tmp_path / "reference" / "loss.csv").read_text().splitlines()
