"""Resuming: a run killed with SIGKILL mid-training and resumed ends with the same weights as
an uninterrupted run with the same seed; a damaged newest checkpoint is set aside with a warning and
the run goes on exactly from the newest intact one; format-1 (.pt) checkpoints still resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ccm_sdk.errors import CorruptCheckpointError, TrainingError
from ccm_sdk.testing.kill import kill_after_checkpoint
from ccm_sdk.training import train
from ccm_sdk.training.checkpoint import list_checkpoints
from ccm_sdk.training.config import dump_config
from ccm_sdk.training.ct_controlnet import CTControlNetTrainer
from ccm_sdk.training.state_files import load_state, state_file_names

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
    killed_at = kill_after_checkpoint(process, checkpoints, step=4)
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


# --- damaged checkpoints and old formats (the tiny VAE: the quickest trainer) ------------------


def _finished_run(vae_config):
    """A six-step run with checkpoints at steps 2, 4 and 6; its weights and loss curve, to compare with."""
    result = train(vae_config(checkpoint__every=2))
    weights = load_file(str(result.outputs["vae"] / "diffusion_pytorch_model.safetensors"))
    checkpoints = result.output_dir / "checkpoints"
    assert [s for s, _ in list_checkpoints(checkpoints)] == [2, 4, 6]
    return result.output_dir, checkpoints, weights, (result.output_dir / "loss.csv").read_text()


def _assert_same_end(output_dir, weights, loss_csv):
    ours = load_file(str(output_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == weights.keys() and all(torch.equal(ours[k], weights[k]) for k in weights)
    assert (output_dir / "loss.csv").read_text() == loss_csv


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_a_corrupt_newest_checkpoint_is_set_aside_and_resume_goes_on_exactly_from_the_one_before(vae_config):
    output_dir, checkpoints, weights, loss_csv = _finished_run(vae_config)
    _truncate(checkpoints / "step-00000006" / "optimizer.safetensors")
    warning = r"step-00000006.*optimizer\.safetensors.*not a readable safetensors.*resuming from the older .*step-00000004.*corrupt-step-00000006"
    with pytest.warns(RuntimeWarning, match=warning):
        resumed = train(vae_config(checkpoint__every=2, checkpoint__resume=True))
    assert resumed.summary["steps_this_run"] == 2  # steps 5 and 6 again, from step 4
    _assert_same_end(output_dir, weights, loss_csv)
    assert (checkpoints / "corrupt-step-00000006" / "optimizer.safetensors").is_file()  # kept for a look
    assert [s for s, _ in list_checkpoints(checkpoints)] == [2, 4, 6]  # step 6 written anew


def test_a_newest_checkpoint_without_its_state_json_is_set_aside_too(vae_config):
    output_dir, checkpoints, weights, loss_csv = _finished_run(vae_config)
    (checkpoints / "step-00000006" / "state.json").unlink()
    with pytest.warns(RuntimeWarning, match=r"step-00000006.*state\.json.*missing.*step-00000004"):
        assert train(vae_config(checkpoint__every=2, checkpoint__resume=True)).summary["steps_this_run"] == 2
    _assert_same_end(output_dir, weights, loss_csv)
    assert (checkpoints / "corrupt-step-00000006").is_dir()


def test_without_an_intact_checkpoint_resume_stops_and_renames_nothing(vae_config):
    _, checkpoints, _, _ = _finished_run(vae_config)
    (checkpoints / "step-00000006" / "state.json").write_text('{"step": 6, "trainer": "va')
    (checkpoints / "step-00000004" / "rng-rank0.safetensors").unlink()
    _truncate(checkpoints / "step-00000002" / "weights" / "trainable.safetensors")
    with pytest.raises(TrainingError, match=r"no intact checkpoint.*state\.json.*not valid JSON.*rng-rank0\.safetensors.*missing.*trainable\.safetensors"):
        train(vae_config(checkpoint__every=2, checkpoint__resume=True))
    assert [s for s, _ in list_checkpoints(checkpoints)] == [2, 4, 6]


def test_a_corrupt_checkpoint_named_explicitly_is_refused(vae_config):
    _, checkpoints, _, _ = _finished_run(vae_config)
    (checkpoints / "step-00000004" / "scheduler.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="scheduler.json.*missing"):
        train(vae_config(checkpoint__every=2, checkpoint__resume=str(checkpoints / "step-00000004")))
    assert (checkpoints / "step-00000004").is_dir()


def _to_format_1(path):
    """Rewrite a checkpoint as versions before format 2 wrote it: every state one torch.save'd .pt file."""
    meta = json.loads((path / "state.json").read_text())
    for name in [*meta["objects"], *(f"rng-rank{r}" for r in range(meta["world_size"]))]:
        torch.save(load_state(path, name), path / f"{name}.pt")
        for file in state_file_names(name):
            (path / file).unlink()
    for key in ("format", "weights", "objects", "digests"):
        del meta[key]
    (path / "state.json").write_text(json.dumps(meta))


def test_a_format_1_checkpoint_resumes_exactly(vae_config):
    output_dir, checkpoints, weights, loss_csv = _finished_run(vae_config)
    _to_format_1(checkpoints / "step-00000004")
    (checkpoints / "step-00000006").rename(checkpoints / "set-aside")
    resumed = train(vae_config(checkpoint__every=2, checkpoint__resume=True))
    assert resumed.summary["steps_this_run"] == 2
    _assert_same_end(output_dir, weights, loss_csv)
