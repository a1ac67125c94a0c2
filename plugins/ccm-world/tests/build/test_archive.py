"""The build archive: finished units and the last checkpoint of an unfinished one carried to a fresh
work dir (another machine), restored only when they are this build's, resumed exactly."""

from __future__ import annotations

import hashlib
import json

import pytest

from ccm_sdk.training import Trainer
from ccm_world.build import main
from ccm_world.build.config import BuildError, load_preset
from ccm_world.build.markers import DONE, STARTED
from ccm_world.build.run import WorldBuild

TEACHER = "teacher/model/unet/diffusion_pytorch_model.safetensors"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _count_steps(monkeypatch) -> list[str]:
    """Names of the trainers whose steps run from now on."""
    ran: list[str] = []
    original = Trainer.training_step

    def counted(self, *args, **kwargs):
        ran.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counted)
    return ran


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    """The tiny preset built up to the teacher with an archive, and the archive."""
    root = tmp_path_factory.mktemp("world-archive")
    build = WorldBuild(load_preset("tiny"), root / "work", models_dir=root / "models", archive=root / "archive", log=lambda m: None)
    build.run(until="teacher")
    return build, root / "archive"


@pytest.mark.slow
def test_finished_units_are_archived_without_checkpoints_or_the_data_cache(archived):
    build, archive = archived
    assert sorted(p.name for p in archive.iterdir()) == ["teacher", "text-encoder", "vae"]
    for name in ("vae", "teacher"):
        assert (archive / name / DONE).is_file() and not (archive / name / "checkpoints").exists()
        assert (build.folder(build.by_name[name]) / "checkpoints").is_dir()  # the work dir keeps them
    assert _digest(archive / TEACHER) == _digest(build.work_dir / TEACHER)
    assert (archive / "teacher" / "loss.csv").is_file()
    assert not list(archive.glob(".*"))  # no temporary folders left


@pytest.mark.slow
def test_a_fresh_work_dir_restores_finished_units_instead_of_training_them(archived, tmp_path, monkeypatch):
    build, archive = archived
    ran = _count_steps(monkeypatch)
    lines: list[str] = []
    fresh = WorldBuild(build.preset, tmp_path / "work", models_dir=tmp_path / "models", archive=archive, log=lines.append)
    plan = {line.split()[0]: line.split()[-1] for line in fresh.plan(fresh.select(until="lcm")).splitlines()[1:]}
    assert plan == {"text-encoder": "archived", "vae": "archived", "data-cache": "pending", "teacher": "archived", "lcm": "pending"}
    reports = {r.unit: r.status for r in fresh.run(until="lcm")}
    assert reports == {"text-encoder": "skipped", "vae": "skipped", "data-cache": "built", "teacher": "skipped", "lcm": "built"}
    assert ran and set(ran) == {"lcd"}  # only the LCM trained
    assert any("teacher: restored (done) from the archive" in line for line in lines)
    assert _digest(tmp_path / "work" / TEACHER) == _digest(build.work_dir / TEACHER)
    assert (archive / "lcm" / DONE).is_file()  # and the new unit went into the archive


@pytest.mark.slow
def test_a_stage_asked_for_alone_restores_its_inputs(archived, tmp_path):
    build, archive = archived
    fresh = WorldBuild(build.preset, tmp_path / "work", models_dir=tmp_path / "models", archive=archive, log=lambda m: None)
    assert fresh.run(stage="data-cache")[0].status == "built"  # needs the VAE: restored, not an error
    assert fresh.state(fresh.by_name["vae"]) == "done"


@pytest.mark.slow
def test_another_configs_archive_is_not_restored(archived, tmp_path, monkeypatch):
    build, archive = archived
    other = WorldBuild(load_preset("tiny", [("teacher.seed", 9)]), tmp_path / "work", models_dir=tmp_path / "models",
                       archive=archive, log=lambda m: None)  # fmt: skip
    ran = _count_steps(monkeypatch)
    reports = {r.unit: r.status for r in other.run(until="teacher")}
    assert reports["vae"] == "skipped" and reports["teacher"] == "built" and set(ran) == {"t2i"}
    assert json.loads((archive / "teacher" / DONE).read_text())["fingerprint"] == other.fingerprint(other.by_name["teacher"])
    # an archived unit whose product is gone is an error, not a silent rebuild
    broken = tmp_path / "broken"
    (broken / "vae").mkdir(parents=True)
    (broken / "vae" / DONE).write_text((archive / "vae" / DONE).read_text())
    with pytest.raises(BuildError, match=r"archive's 'vae' has a done-marker but no 'vae'.*incomplete"):
        WorldBuild(build.preset, tmp_path / "work2", archive=broken, log=lambda m: None).run(until="vae")


@pytest.mark.slow
def test_an_unfinished_unit_is_carried_by_its_last_checkpoint_and_resumes_exactly(archived, tmp_path, monkeypatch):
    reference, _ = archived
    preset = load_preset("tiny", [("teacher.config.train.max_steps", 3)])
    finished = WorldBuild(preset, tmp_path / "uninterrupted", log=lambda m: None)
    finished.run(until="teacher")
    original = Trainer.training_step

    def killed(self, *args, step, **kwargs):
        if self.name == "t2i" and step == 2:  # killed after the step-1 checkpoint
            raise KeyboardInterrupt
        return original(self, *args, step=step, **kwargs)

    archive = tmp_path / "archive"
    first = WorldBuild(preset, tmp_path / "machine-1", archive=archive, log=lambda m: None)
    monkeypatch.setattr(Trainer, "training_step", killed)
    with pytest.raises(KeyboardInterrupt):
        first.run(until="teacher")
    monkeypatch.setattr(Trainer, "training_step", original)
    assert first.save_archive() == {"teacher": "partial@1"}
    assert first.save_archive() == {}  # nothing newer
    assert json.loads((archive / "teacher" / STARTED).read_text())["fingerprint"] == first.fingerprint(first.by_name["teacher"])
    assert [p.name for p in (archive / "teacher" / "checkpoints").iterdir()] == ["step-00000001"]
    # another machine: a fresh work dir, the archive only
    lines: list[str] = []
    second = WorldBuild(preset, tmp_path / "machine-2", archive=archive, log=lines.append)
    assert "archived (step 1)" in second.plan([second.by_name["teacher"]])
    assert {r.unit: r.status for r in second.run(until="teacher")}["teacher"] == "resumed@1"
    assert any("teacher: restored (partial@1)" in line for line in lines)
    assert _digest(tmp_path / "machine-2" / TEACHER) == _digest(tmp_path / "uninterrupted" / TEACHER)
    assert not (archive / "teacher" / "checkpoints").exists()  # finished now: the archive keeps the product only


def test_command_line_flags(tmp_path, capsys):
    args = ["--preset", "tiny", "--work-dir", str(tmp_path / "work")]
    assert main([*args, "--save-archive"]) == 2
    assert "no archive folder: give --archive DIR" in capsys.readouterr().err
    assert main([*args, "--archive", str(tmp_path / "a"), "--save-archive", "--stage", "vae"]) == 2
    assert "--save-archive copies the whole work dir's progress" in capsys.readouterr().err
    assert main([*args, "--archive", str(tmp_path / "a"), "--save-archive"]) == 0
    assert "nothing new to archive" in capsys.readouterr().out


@pytest.mark.slow
def test_a_stopped_build_archives_the_step_its_trainer_reached(tmp_path, monkeypatch, capsys):
    import os
    import signal

    original = Trainer.training_step

    def step(self, *args, step, **kwargs):
        loss = original(self, *args, step=step, **kwargs)
        if self.name == "t2i" and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. `kill <pid>` when the machine is about to go
        return loss

    monkeypatch.setattr(Trainer, "training_step", step)
    archive = tmp_path / "archive"
    args = ["--preset", "tiny", "--work-dir", str(tmp_path / "work"), "--archive", str(archive), "--until", "teacher",
            "--set", "teacher.config.train.max_steps=3", "--set", 'teacher.config.checkpoint={"every": 2, "keep_last": 1}']  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stopped: t2i: stopped by SIGTERM at step 1 of 3" in err and "run the same command again" in err
    assert [p.name for p in (archive / "teacher" / "checkpoints").iterdir()] == ["step-00000001"]
    monkeypatch.setattr(Trainer, "training_step", original)
    assert main(args) == 0  # goes on from step 1
    assert (archive / "teacher" / DONE).is_file()


@pytest.mark.slow
def test_a_time_limit_stops_the_build_as_a_signal_would(tmp_path, monkeypatch, capsys):
    from ccm_sdk.utils import stopping as stop

    now = [0.0]
    monkeypatch.setattr(stop, "monotonic", lambda: now[0])
    original = Trainer.training_step

    def step(self, *args, step, **kwargs):
        loss = original(self, *args, step=step, **kwargs)
        if self.name == "t2i" and step == 1:
            now[0] = 7200.0  # the hour runs out during the teacher's first step
        return loss

    monkeypatch.setattr(Trainer, "training_step", step)
    archive = tmp_path / "archive"
    args = ["--preset", "tiny", "--work-dir", str(tmp_path / "work"), "--archive", str(archive), "--until", "lcm",
            "--set", "teacher.config.train.max_steps=3", "--set", 'teacher.config.checkpoint={"every": 2, "keep_last": 1}']  # fmt: skip
    assert main([*args, "--stop-after", "1h"]) == 1
    err = capsys.readouterr().err
    assert "stopped: t2i: stopped by the time limit at step 1 of 3" in err and "run the same command again" in err
    assert [p.name for p in (archive / "teacher" / "checkpoints").iterdir()] == ["step-00000001"]
    # a limit that has run out before a stage starts: it is not started, and nothing is lost
    now[0] = 0.0
    monkeypatch.setattr(Trainer, "training_step", original)
    monkeypatch.setattr(stop, "monotonic", lambda: now.pop() if now else 100.0)
    assert main([*args, "--stop-after", "50s"]) == 1
    assert "stopped: the time limit ran out before stage 'teacher'" in capsys.readouterr().err
    assert [p.name for p in (archive / "teacher" / "checkpoints").iterdir()] == ["step-00000001"]
    assert main([*args, "--stop-after", "0s"]) == 2
    assert "a duration must be more than zero, got '0s'" in capsys.readouterr().err
