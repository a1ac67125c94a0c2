"""``ccm train``: config file plus overrides, progress and loss curve, --resume, --help, errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from ccm_sdk.cli import main
from ccm_sdk.training.cli import parse_train_args
from ccm_sdk.training.config import dump_config


def test_parse_overrides():
    config, overrides, show_help, stop_after, export = parse_train_args(
        ["--config", "c.yaml", "train.lr=1e-4", "--max_steps", "10", "--gradient_checkpointing", "--data.resolution=64", "--resume"]
    )
    assert config == "c.yaml" and not show_help and stop_after is None and export is None
    assert overrides == [("train.lr", 1e-4), ("max_steps", 10), ("gradient_checkpointing", True),
                         ("data.resolution", 64), ("checkpoint.resume", "latest")]  # fmt: skip
    assert parse_train_args(["--resume", "out/checkpoints/step-00000010", "-h"])[1:] == (
        [("checkpoint.resume", "out/checkpoints/step-00000010")], True, None, None)  # fmt: skip
    assert parse_train_args(["--stop-after", "1h30m", "--max_steps", "3"])[1:] == ([("max_steps", 3)], False, 5400.0, None)
    assert parse_train_args(["--export", "--max_steps", "3"]).export == "latest"
    assert parse_train_args(["--export", "out/checkpoints/step-00000002"]).export == "out/checkpoints/step-00000002"


def test_export_writes_a_checkpoints_model_without_training(make_config, tmp_path, capsys):
    from safetensors.torch import load_file

    from ccm_sdk.pipeline import load_controlnet

    config = make_config("ct_controlnet", train__max_steps=2, checkpoint__every=1, checkpoint__keep_last=2, log__progress=False)
    config_file = dump_config(config, tmp_path / "c.yaml")
    assert main(["train", "ct_controlnet", "--config", str(config_file)]) == 0
    out = tmp_path / "out-ct_controlnet"
    step_1 = out / "checkpoints" / "step-00000001"
    capsys.readouterr()
    assert main(["train", "ct_controlnet", "--config", str(config_file), "--export", str(step_1)]) == 0
    exported = out / "export" / "step-00000001" / "controlnet"
    assert f"controlnet: {exported}" in capsys.readouterr().out
    trained = load_file(str(step_1 / "weights" / "trainable.safetensors"))
    net = load_controlnet(str(exported)).state_dict()
    assert all(torch.equal(net[name], value) for name, value in trained.items())
    final = load_controlnet(str(out / "controlnet")).state_dict()
    assert any(not torch.equal(net[name], final[name]) for name in trained)  # step 1, not the end of the run
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2  # the run's own outputs are untouched
    assert main(["train", "ct_controlnet", "--config", str(config_file), "--export"]) == 0  # the newest: step 2
    assert (out / "export" / "step-00000002" / "controlnet" / "config.json").is_file()
    assert main(["train", "ct_controlnet", "--config", str(config_file), "--export", str(tmp_path)]) == 2
    assert "is not a training checkpoint" in capsys.readouterr().err


def test_train_stops_at_the_time_limit_and_resumes(make_config, tmp_path, capsys, monkeypatch):
    from ccm_sdk.utils import stopping as stop

    config_file = dump_config(make_config("ct_controlnet", train__max_steps=4, log__progress=False), tmp_path / "c.yaml")
    calls = iter([0.0, 0.0, 10.0])  # the deadline is set at 0 + 5 s; step 1 sees 0.0, step 2 sees 10.0 (run out)
    monkeypatch.setattr(stop, "monotonic", lambda: next(calls, 10.0))
    assert main(["train", "ct_controlnet", "--config", str(config_file), "--stop-after", "5s"]) == 1
    assert "ccm: stopped: ct_controlnet: stopped by the time limit at step 2 of 4" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "ct_controlnet", "--config", str(config_file), "--resume"]) == 0
    summary = json.loads((tmp_path / "out-ct_controlnet" / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2
    assert main(["train", "ct_controlnet", "--config", str(config_file), "--stop-after", "soon"]) == 2
    assert "expected a duration like 90 (seconds), 45s, 20m, 2h or 1h30m, got 'soon'" in capsys.readouterr().err


def test_train_resume_and_outputs(make_config, tmp_path, capsys):
    config = make_config("ct_controlnet", train__max_steps=2, log__progress=True, log__plot=True)
    config_file = dump_config(config, tmp_path / "c.yaml")
    assert main(["train", "ct_controlnet", "--config", str(config_file)]) == 0
    captured = capsys.readouterr()
    assert "step/s" in captured.err and "loss=" in captured.err  # tqdm: rate, ETA and the loss
    assert "controlnet:" in captured.out
    out = tmp_path / "out-ct_controlnet"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [r["step"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)
    # --resume with a larger --max_steps runs only the missing steps
    assert main(["train", "ct_controlnet", "--config", str(config_file), "--max_steps", "3", "--resume", "log.progress=false"]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["steps_this_run"] == 1


def test_help_lists_the_keys(capsys):
    assert main(["train", "lcd", "--help"]) == 0
    text = capsys.readouterr().out
    assert "lcd: latent consistency distillation" in text
    assert "ema_decay = 0.95" in text and "train.lr = 1e-05" in text


def test_help_before_a_trainer_lists_the_registered_trainers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "trainers:\n" in text
    assert "  lcd            latent consistency distillation of a diffusion model into an LCM" in text
    assert "[ccm_sdk.builtin.trainers]" in text and "examples:" in text


def test_errors_exit_2_with_the_message(tmp_path, capsys):
    assert main(["train", "dm_controlnet", "output_dir=o", "model=m", "train.lrr=1"]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err
    assert main(["train", "gan"]) == 2
    assert "unknown trainer 'gan'; available: adapter, ct_controlnet, dm_controlnet" in capsys.readouterr().err
