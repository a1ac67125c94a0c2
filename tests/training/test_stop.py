"""Stopping a training run with SIGTERM / SIGUSR1 or a time limit: the step reached is checkpointed, a typed error
says where, the handlers are put back, and resuming gives the same weights as a run that was never stopped.
The signals and limits themselves are tested in tests/utils/test_stopping.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from ccm_sdk.errors import InputError, TrainingError, TrainingInterrupted
from ccm_sdk.training import train
from ccm_sdk.training.checkpoint import list_checkpoints
from ccm_sdk.training.core import Trainer
from ccm_sdk.utils import stopping
from ccm_sdk.utils.stopping import time_limit, time_limit_reached


def _at_step(monkeypatch, at: int, action) -> None:
    """Run ``action()`` right after training step ``at``."""
    original = Trainer.training_step

    def step(self, *args, step, **kwargs):
        loss = original(self, *args, step=step, **kwargs)
        if step == at:
            action()
        return loss

    monkeypatch.setattr(Trainer, "training_step", step)


def _signal_at(monkeypatch, step_to_signal: int, number: int) -> None:
    # os.kill is delivered before the next bytecode: as if from outside
    _at_step(monkeypatch, step_to_signal, lambda: os.kill(os.getpid(), number))


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_checkpoints_the_step_reached_and_resume_is_exact(vae_config, tmp_path, monkeypatch, number):
    reference = train(vae_config(output_dir=str(tmp_path / "reference")))
    before = signal.getsignal(signal.SIGTERM)
    _signal_at(monkeypatch, 3, number)
    with pytest.raises(TrainingInterrupted, match=rf"stopped by {signal.Signals(number).name} at step 3 of 6.*step-00000003.*--resume"):
        train(vae_config())
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handlers are gone
    assert [s for s, _ in list_checkpoints(tmp_path / "out" / "checkpoints")] == [3]  # not a periodic one (every 4)
    monkeypatch.undo()
    resumed = train(vae_config(checkpoint__resume=True))
    ours, theirs = (load_file(str(r.outputs["vae"] / "diffusion_pytorch_model.safetensors")) for r in (resumed, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert issubclass(TrainingInterrupted, TrainingError)


def test_a_signal_at_the_last_step_just_finishes(vae_config, monkeypatch):
    _signal_at(monkeypatch, 6, signal.SIGTERM)
    assert train(vae_config()).step == 6


def test_a_time_limit_stops_the_loop_and_resume_is_exact(vae_config, tmp_path, monkeypatch):
    reference = train(vae_config(output_dir=str(tmp_path / "reference")))
    now = [0.0]
    monkeypatch.setattr(stopping, "monotonic", lambda: now[0])
    _at_step(monkeypatch, 2, lambda: now.__setitem__(0, 61.0))
    with time_limit(60):
        with pytest.raises(TrainingInterrupted, match="stopped by the time limit at step 2 of 6"):
            train(vae_config())
        assert time_limit_reached()
    assert not time_limit_reached()  # the limit ends with its block
    monkeypatch.undo()
    resumed = train(vae_config(checkpoint__resume=True))
    ours, theirs = (load_file(str(r.outputs["vae"] / "diffusion_pytorch_model.safetensors")) for r in (resumed, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(InputError, match="positive number of seconds"):
        with time_limit(0):
            pass
