"""Checkpoints: contents, atomic writes, rotation, RNG states, and what refuses to load."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ccm_sdk.errors import CorruptCheckpointError, TrainingError
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
    files = {"weights", "optimizer.json", "optimizer.safetensors", "rng-rank0.json", "rng-rank0.safetensors", "state.json"}
    assert {p.name for p in path.iterdir()} == files  # no pickle anywhere
    meta = json.loads((path / "state.json").read_text())
    assert meta["format"] == 2 and meta["weights"] == ["ema", "trainable"] and meta["objects"] == ["optimizer"]
    loaded = ckpt.load_checkpoint(path, rank=0, world_size=1, trainer="t", objects=("optimizer",))
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


# --- damaged checkpoints -----------------------------------------------------------------


def _truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _flip_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's data: the file still parses
    file.write_bytes(bytes(data))


def _edit_state(path, **changes):
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, **changes}))


DAMAGES = {
    "truncated weights": (lambda p: _truncate(p / "weights" / "trainable.safetensors"), "weights/trainable.safetensors", "not a readable safetensors"),
    "truncated optimizer": (lambda p: _truncate(p / "optimizer.safetensors", 0.9), "optimizer.safetensors", "not a readable safetensors"),
    "truncated RNG state": (lambda p: _truncate(p / "rng-rank0.json"), "rng-rank0.json", "not valid JSON"),
    "broken state.json": (lambda p: _truncate(p / "state.json"), "state.json", "not valid JSON"),
    "state.json lacking keys": (lambda p: (p / "state.json").write_text('{"step": 3, "trainer": "t"}'), "state.json", "world_size"),
    "state.json naming odd files": (
        lambda p: (p / "state.json").write_text(json.dumps({**json.loads((p / "state.json").read_text()), "weights": ["../x"]})),
        "state.json", r"weights \(a list of names\)",
    ),
    "state.json with a negative step": (lambda p: _edit_state(p, step=-1), "state.json", r"step -1 does not fit the checkpoint 'step-00000003' \(expected 3\)"),
    "state.json with another step": (lambda p: _edit_state(p, step=10**9), "state.json", r"step 1000000000 does not fit .* \(expected 3\)"),
    "state.json with a broken history": (lambda p: _edit_state(p, history="x"), "state.json", r"history \(a list of \[step, loss, lr\]\)"),
    "state.json with short history rows": (lambda p: _edit_state(p, history=[[1, 0.5]]), "state.json", r"history \(a list of"),
    "missing optimizer": (lambda p: (p / "optimizer.json").unlink(), "optimizer.json", "missing"),
    "missing EMA weights": (lambda p: (p / "weights" / "ema.safetensors").unlink(), "weights/ema.safetensors", "missing"),
    "a flipped bit in the weights": (lambda p: _flip_last_byte(p / "weights" / "trainable.safetensors"), "weights/trainable.safetensors", "SHA-256 differs"),
    "a flipped bit in the optimizer": (lambda p: _flip_last_byte(p / "optimizer.safetensors"), "optimizer.safetensors", "SHA-256 differs"),
    "state.json with bad digests": (lambda p: _edit_state(p, digests={"../x": "0" * 64}), "state.json", r"digests \(file name -> SHA-256"),
    "optimizer without its keys": (
        lambda p: (p / "optimizer.json").write_text('{"format": "ccm-state-1", "state": {"state": {}}}'), "optimizer.json", r"lacks the keys \['param_groups'\]"
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_names_the_bad_file(tmp_path, damage):
    path = ckpt.save_checkpoint(_single_process(), tmp_path, _state(3), keep_last=2)
    spoil, file, reason = DAMAGES[damage]
    spoil(path)
    with pytest.raises(CorruptCheckpointError, match=reason) as caught:
        ckpt.load_checkpoint(path, rank=0, world_size=1, trainer="t", objects=("optimizer",))
    assert caught.value.checkpoint == str(path) and caught.value.file == str(path / file)
    assert str(path) in str(caught.value) and file.split("/")[-1] in str(caught.value)


def test_a_checkpoint_without_a_state_it_needs_is_corrupt(tmp_path):
    path = ckpt.save_checkpoint(_single_process(), tmp_path, _state(3), keep_last=2)
    with pytest.raises(CorruptCheckpointError, match="scheduler.json.*holds no scheduler state"):
        ckpt.load_checkpoint(path, rank=0, world_size=1, trainer="t", objects=("optimizer", "scheduler"))


def _format_1(tmp_path, step=3):
    """A checkpoint as versions before format 2 wrote it: .pt files read with torch.load."""
    path = tmp_path / ckpt.checkpoint_name(step)
    (path / "weights").mkdir(parents=True)
    state = _state(step)
    for name, weights in state.weights.items():
        ckpt.save_file(weights, str(path / "weights" / f"{name}.safetensors"))
    torch.save(state.objects["optimizer"], path / "optimizer.pt")
    torch.save(ckpt.capture_rng(), path / "rng-rank0.pt")
    (path / "state.json").write_text(json.dumps({"step": step, "world_size": 1, **state.meta}))
    return path


def test_format_1_checkpoints_still_load_weights_only(tmp_path):
    path = _format_1(tmp_path)
    loaded = ckpt.load_checkpoint(path, rank=0, world_size=1, trainer="t", objects=("optimizer",))
    assert loaded.step == 3 and loaded.objects["optimizer"]["state"][0]["step"].item() == 3.0
    assert torch.equal(loaded.weights["trainable"]["w"], torch.full((2, 3), 3.0)) and torch.equal(loaded.rng["torch"], torch.get_rng_state())
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]


class Payload:
    """Unpickling this would call os.system: a format-1 file built to run code."""

    def __reduce__(self):
        import os

        return os.system, ("touch pickle-ran",)


def test_a_format_1_file_that_needs_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _format_1(tmp_path)
    torch.save({"state": {}, "param_groups": [], "extra": Payload()}, path / "optimizer.pt")
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt.*not a weights-only torch file.*GLOBAL posix.system") as caught:
        ckpt.load_checkpoint(path, rank=0, world_size=1, trainer="t")
    assert caught.value.file == str(path / "optimizer.pt") and "weights_only" not in str(caught.value)  # no advice to unpickle
    assert not (tmp_path / "pickle-ran").exists()
    _truncate(path / "rng-rank0.pt")
    (path / "optimizer.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match="rng-rank0.pt.*not a readable torch file"):
        ckpt.load_checkpoint(path, rank=0, world_size=1, trainer="t")


def test_mark_corrupt_renames_out_of_the_way(tmp_path):
    for step in (2, 4):
        ckpt.save_checkpoint(_single_process(), tmp_path, _state(step), keep_last=3)
    moved = ckpt.mark_corrupt(tmp_path / "step-00000004")
    assert moved.name == "corrupt-step-00000004" and [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    ckpt.save_checkpoint(_single_process(), tmp_path, _state(4), keep_last=1)
    assert ckpt.mark_corrupt(tmp_path / "step-00000004").name == "corrupt-step-00000004-2"
    ckpt.save_checkpoint(_single_process(), tmp_path, _state(6), keep_last=1)  # rotation leaves them alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt-step-00000004", "corrupt-step-00000004-2", "step-00000006"]
