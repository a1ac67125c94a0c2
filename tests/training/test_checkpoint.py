"""Checkpoints: contents, atomic writes, rotation, RNG states, and what refuses to load."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ccm_sdk.errors import TrainingError
from ccm_sdk.training import checkpoint as ckpt
from ccm_sdk.utils.atomic import remove_temporary_folders


def _single_process():
    return SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, wait_for_everyone=lambda: None)


def _state(step: int) -> ckpt.Checkpoint:
    weights = {"trainable": {"w": torch.full((2, 3), float(step))}, "ema": {"w": torch.zeros(2, 3)}}
    objects = {"optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": []}}
    return ckpt.Checkpoint(step=step, weights=weights, objects=objects, meta={"trainer": "t", "history": [[step, 0.5, 1e-4]]})


def test_save_and_load_round_trip(tmp_path):
    path = ckpt.save_checkpoint(_single_process(), tmp_path, _state(3), keep_last=2)
    assert path.name == "step-00000003"
    assert {p.name for p in path.iterdir()} == {"weights", "optimizer.pt", "rng-rank0.pt", "state.json"}
    loaded = ckpt.load_checkpoint(path, rank=0, world_size=1, trainer="t")
    assert loaded.step == 3 and loaded.meta["history"] == [[3, 0.5, 1e-4]]
    assert torch.equal(loaded.weights["trainable"]["w"], torch.full((2, 3), 3.0)) and set(loaded.weights) == {"trainable", "ema"}
    assert loaded.objects["optimizer"]["state"][0]["step"].item() == 3.0
    assert torch.equal(loaded.rng["torch"], torch.get_rng_state())


def test_keeps_the_last_k(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(_single_process(), tmp_path, _state(step), keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000005"


def test_a_write_that_dies_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(_single_process(), tmp_path, _state(2), keep_last=3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(_single_process(), tmp_path, _state(4), keep_last=3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]  # the half-written one is not listed
    assert (tmp_path / ".tmp-step-00000004").is_dir()
    remove_temporary_folders(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]


def test_rewriting_a_step_replaces_it(tmp_path):
    ckpt.save_checkpoint(_single_process(), tmp_path, _state(2), keep_last=3)
    state = _state(2)
    state.weights["trainable"]["w"] += 1
    path = ckpt.save_checkpoint(_single_process(), tmp_path, state, keep_last=3)
    assert ckpt.load_checkpoint(path, rank=0, world_size=1, trainer="t").weights["trainable"]["w"][0, 0] == 3.0


def test_rng_states_round_trip():
    state = ckpt.capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_checkpoints_that_do_not_fit_are_refused(tmp_path):
    path = ckpt.save_checkpoint(_single_process(), tmp_path, _state(1), keep_last=1)
    with pytest.raises(TrainingError, match="written by 1 process.*this run has 2"):
        ckpt.load_checkpoint(path, rank=0, world_size=2, trainer="t")
    with pytest.raises(TrainingError, match="trainer 't', not 'lcd'"):
        ckpt.load_checkpoint(path, rank=0, world_size=1, trainer="lcd")
    with pytest.raises(TrainingError, match="not a training checkpoint"):
        ckpt.load_checkpoint(tmp_path, rank=0, world_size=1, trainer="t")
