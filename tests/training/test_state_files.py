"""Training state as safetensors + JSON: exact round trips of optimizer, scheduler, grad scaler and RNG
states, what cannot be stored, and damaged files named in a typed error."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from ccm_sdk.errors import CorruptCheckpointError, InputTypeError, TrainingError
from ccm_sdk.training.checkpoint import capture_rng, restore_rng
from ccm_sdk.training.state_files import decode_state, encode_state, load_state, save_state, states_equal


def _round_trip(state, folder, name="state"):
    save_state(state, folder, name)
    return load_state(folder, name)


def _trained_optimizer(make, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = make(model.parameters())
    for _ in range(steps):
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    ],
    ids=["adamw", "adam-amsgrad", "sgd-momentum"],
)
def test_optimizer_state_round_trips_exactly_and_training_continues_identically(make, tmp_path):
    model, optimizer = _trained_optimizer(make)
    state = optimizer.state_dict()
    loaded = _round_trip(state, tmp_path, "optimizer")
    assert states_equal(loaded, state)
    assert isinstance(loaded["param_groups"][0].get("betas", ()), tuple)  # tuples stay tuples
    if "max_exp_avg_sq" in state["state"][0]:
        assert torch.equal(loaded["state"][0]["max_exp_avg_sq"], state["state"][0]["max_exp_avg_sq"])
    # a copy of the model whose optimizer reads the stored state takes bit-identical steps
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    twin.load_state_dict(model.state_dict())
    twin_optimizer = make(twin.parameters())
    twin_optimizer.load_state_dict(loaded)
    batch = torch.randn(5, 3)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        m(batch).square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_scheduler_and_grad_scaler_states_round_trip(tmp_path):
    model, optimizer = _trained_optimizer(lambda p: torch.optim.AdamW(p, lr=1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 3))
    for _ in range(4):
        optimizer.step()  # no gradients: the weights stay, the order of calls is the usual one
        scheduler.step()
    state = scheduler.state_dict()
    loaded = _round_trip(state, tmp_path, "scheduler")
    assert states_equal(loaded, state) and loaded["_last_lr"] == state["_last_lr"]
    fresh = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 3))
    fresh.load_state_dict(loaded)
    optimizer.step(), scheduler.step(), fresh.step()
    assert fresh.get_last_lr() == scheduler.get_last_lr()
    scaler = {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 17}
    assert states_equal(_round_trip(scaler, tmp_path, "scaler"), scaler)


def test_rng_states_round_trip_and_restore_the_same_streams(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn()  # leaves cached gaussians in both states
    state = capture_rng()
    first = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    loaded = _round_trip(state, tmp_path, "rng-rank0")
    assert states_equal(loaded, state)
    restore_rng(loaded)
    second = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:4] == second[:4] and torch.equal(first[4], second[4])


def test_awkward_values_round_trip(tmp_path):
    state = {
        "floats": [0.1, 1e-300, -0.0, math.inf, -math.inf, math.nan, 2**-1074],
        "ints": {3: 2**62, -1: 0},  # non-string keys
        "nested": ({"__tensor__": "not a reference"}, None, True, "text"),
        "tensors": [torch.tensor(1.5, dtype=torch.bfloat16), torch.arange(6, dtype=torch.uint8).reshape(2, 3).t(), torch.zeros(0, 4)],
        "numpy": [np.float32(0.25), np.int64(7)],
    }
    state["shared"] = [state["tensors"][1], state["tensors"][1][0]]  # views of one buffer
    loaded = _round_trip(state, tmp_path)
    assert str(loaded["floats"]) == str(state["floats"]) and math.copysign(1, loaded["floats"][2]) == -1
    assert loaded["ints"] == {3: 2**62, -1: 0} and loaded["nested"] == state["nested"]
    assert states_equal(loaded["tensors"], state["tensors"]) and states_equal(loaded["shared"], state["shared"])
    assert loaded["numpy"] == [0.25, 7]


def test_what_needs_pickle_is_refused():
    with pytest.raises(InputTypeError, match="cannot store function at 'lr_lambdas.0'"):
        encode_state({"lr_lambdas": [lambda step: 1.0]})


def test_the_json_holds_structure_and_the_safetensors_the_tensors(tmp_path):
    json_file, tensors_file = save_state({"state": {0: {"exp_avg": torch.ones(2)}}, "lr": 0.5}, tmp_path, "optimizer")
    document = json.loads(json_file.read_text())
    assert document["state"]["lr"] == 0.5 and "__dict__" in document["state"]["state"]
    structure, tensors = encode_state({"a": [torch.ones(1)]})
    assert structure == {"a": [{"__tensor__": "a.0"}]} and list(tensors) == ["a.0"]
    assert states_equal(decode_state(structure, tensors), {"a": [torch.ones(1)]})


@pytest.mark.parametrize(
    "damage, file, reason",
    [
        (lambda d: (d / "s.safetensors").write_bytes((d / "s.safetensors").read_bytes()[:-5]), "s.safetensors", "not a readable safetensors"),
        (lambda d: (d / "s.json").write_text((d / "s.json").read_text()[:-9]), "s.json", "not valid JSON"),
        (lambda d: (d / "s.json").write_text('{"format": "ccm-state-1", "state": {"w": {"__tensor__": "gone"}}}'), "s.json", "names tensor 'gone'"),
        (lambda d: (d / "s.json").write_text("[1, 2]"), "s.json", "expected a 'ccm-state-1' document"),
        (lambda d: (d / "s.safetensors").unlink(), "s.safetensors", "missing"),
    ],
    ids=["truncated-safetensors", "truncated-json", "dangling-tensor", "foreign-json", "missing-file"],
)
def test_damaged_files_are_named_in_a_typed_error(tmp_path, damage, file, reason):
    save_state({"w": torch.randn(4, 4), "step": 3}, tmp_path, "s")
    damage(tmp_path)
    with pytest.raises(CorruptCheckpointError, match=reason) as caught:
        load_state(tmp_path, "s")
    assert caught.value.file == str(tmp_path / file) and caught.value.checkpoint == str(tmp_path)
    assert isinstance(caught.value, TrainingError)
