"""``ccm-world build --jobs N``: independent stages side by side in child processes, with the same
fingerprints, markers and resume as a one-stage build, and a stop or failure that ends the build cleanly."""

from __future__ import annotations

import shutil
import sys

import pytest

from ccm_sdk.errors import Interrupted
from ccm_world.build import jobs as build_jobs
from ccm_world.build import main
from ccm_world.build.config import BuildError, load_preset
from ccm_world.build.markers import DONE, read_marker
from ccm_world.build.run import WorldBuild


@pytest.fixture(scope="module")
def until_lcm(tmp_path_factory):
    """The tiny preset built up to the LCM, one stage after another."""
    root = tmp_path_factory.mktemp("world-jobs")
    WorldBuild(load_preset("tiny"), root / "work", models_dir=root / "models", log=lambda m: None).run(until="lcm")
    return root


def _copy(until_lcm, tmp_path):
    shutil.copytree(until_lcm / "work", tmp_path / "work")
    return tmp_path / "work", tmp_path / "models"


@pytest.mark.slow
def test_two_jobs_build_the_controlnets_side_by_side_as_one_stage_builds_would(until_lcm, tmp_path):
    work, models = _copy(until_lcm, tmp_path)
    lines: list[str] = []
    build = WorldBuild(load_preset("tiny"), work, models_dir=models, log=lines.append)
    units = build.select("dm-controlnets")
    reports = build.run(stage="dm-controlnets", jobs=2)
    assert [r.unit for r in reports] == [u.name for u in units] and {r.status for r in reports} == {"built"}
    for unit in units:  # each child left the marker of this build's own fingerprint, and its log
        assert read_marker(build.folder(unit), DONE)["fingerprint"] == build.fingerprint(unit)
        assert build.state(unit) == "done" and (build.folder(unit) / build_jobs.JOB_LOG).stat().st_size > 0
    events = [line.split(":")[0].strip("=> ") for line in lines if ": started (job" in line or ": built in" in line]
    first_done = next(i for i, line in enumerate(lines) if ": built in" in line)
    assert sum(": started (job" in line for line in lines[:first_done]) == 2, events  # two ran at once
    assert "1 thread(s)" in next(line for line in lines if ": started (job" in line)  # tiny's 2 threads shared out
    # run again: every stage is done, nothing starts
    lines.clear()
    assert {r.status for r in build.run(stage="dm-controlnets", jobs=2)} == {"skipped"}
    assert not any("started (job" in line for line in lines)


def _fake_children(monkeypatch, scripts: dict[str, str], default: str = "raise SystemExit(0)"):
    """Children that run a line of Python instead of a stage, one per unit name."""

    def command(build, unit, preset_file):
        return [sys.executable, "-c", scripts.get(unit.name, default)]

    monkeypatch.setattr(build_jobs, "child_command", command)


def test_a_failed_stage_lets_the_running_one_finish_and_starts_no_other(until_lcm, tmp_path, monkeypatch):
    work, models = _copy(until_lcm, tmp_path)
    lines: list[str] = []
    build = WorldBuild(load_preset("tiny"), work, models_dir=models, log=lines.append)
    first, second = (u.name for u in build.select("dm-controlnets")[:2])
    _fake_children(monkeypatch, {first: "import sys; print('boom'); sys.exit(3)", second: "import time; time.sleep(2)"})
    with pytest.raises(BuildError, match=rf"stage\(s\) {first} failed; their logs: .*{first}/build-job.log"):
        build.run(stage="dm-controlnets", jobs=2)
    assert sum("started (job" in line for line in lines) == 2  # the other five never started
    assert any(f"{second}: built in" in line for line in lines)  # the running one was waited for
    assert (work / first / build_jobs.JOB_LOG).read_text().strip() == "boom"


def test_a_stopped_stage_stops_the_build_and_an_exception_is_not_a_stop(until_lcm, tmp_path, monkeypatch):
    work, models = _copy(until_lcm, tmp_path)
    build = WorldBuild(load_preset("tiny"), work, models_dir=models, log=lambda m: None)
    first = build.select("dm-controlnets")[0].name
    stopped = "import sys; print('stopped: the time limit ran out; run the same command again to go on'); sys.exit(1)"
    _fake_children(monkeypatch, {first: stopped})
    with pytest.raises(Interrupted, match=rf"the build stopped \({first}\) before "):
        build.run(stage="dm-controlnets", jobs=2)
    _fake_children(monkeypatch, {first: "raise RuntimeError('a bug')"})  # exit status 1 too, but a failure
    with pytest.raises(BuildError, match=rf"stage\(s\) {first} failed"):
        build.run(stage="dm-controlnets", jobs=2)


def test_children_get_the_time_left_and_a_preset_that_fingerprints_the_same(until_lcm, tmp_path):
    from ccm_sdk.utils.stopping import time_limit

    work, models = _copy(until_lcm, tmp_path)
    build = WorldBuild(load_preset("tiny", [("dm_controlnets.seed", 9)]), work, models_dir=models, log=lambda m: None)
    path = build_jobs.write_child_preset(build, threads=1)
    child = WorldBuild(load_preset(path), work, models_dir=models, log=lambda m: None)
    assert child.preset.threads == 1 and child.preset.progress is False and child.preset.dm_controlnets.seed == 9
    assert all(child.fingerprint(u) == build.fingerprint(u) for u in build.units)
    unit = build.by_name["dm-controlnet-sketch"]
    command = build_jobs.child_command(build, unit, path)
    assert command[command.index("--stage") + 1] == "dm-controlnet-sketch" and "--stop-after" not in command
    assert command[command.index("--models-dir") + 1] == str(models.resolve())
    with time_limit(600):
        command = build_jobs.child_command(build, unit, path)
    assert 595 <= float(command[command.index("--stop-after") + 1].rstrip("s")) <= 600


def test_jobs_refuses_what_it_cannot_do(until_lcm, tmp_path, capsys):
    work, models = _copy(until_lcm, tmp_path)
    build = WorldBuild(load_preset("tiny"), work, models_dir=models, log=lambda m: None)
    with pytest.raises(BuildError, match="jobs must be at least 1, got 0"):
        build.run(stage="dm-controlnets", jobs=0)
    with pytest.raises(BuildError, match="--force rebuilds stages one after another"):
        build.run(stage="lcm", force=True, jobs=2)
    with pytest.raises(BuildError, match="stage 'adapter' needs 'dm-controlnet-sketch', which is not built"):
        build.run(stage="adapter", jobs=2)
    args = ["--preset", "tiny", "--work-dir", str(work), "--models-dir", str(models)]
    assert main([*args, "--jobs", "2", "--measure", "1"]) == 2
    assert "not with --measure" in capsys.readouterr().err
    assert main([*args, "--jobs", "0"]) == 2
    assert "--jobs N needs N >= 1, got 0" in capsys.readouterr().err


def test_a_unit_every_other_one_needs_gets_every_thread(until_lcm, tmp_path):
    build = WorldBuild(load_preset("tiny"), tmp_path / "work", models_dir=tmp_path / "models", log=lambda m: None)
    units = list(build.units)
    by = build.by_name
    assert build_jobs.alone(build, by["vae"], units[1:])  # with the text encoder started, all the rest needs the VAE
    assert not build_jobs.alone(build, by["vae"], units)  # the text encoder does not: they share
    assert build_jobs.alone(build, by["data-cache"], units[2:])
    after_cache = units[3:]
    assert not build_jobs.alone(build, by["teacher"], after_cache)  # the feature and map nets need only the cache
    assert build_jobs.alone(build, by["pack"], [by["pack"], *[u for u in units if u.kind == "eval"]])
    assert build_jobs.needs_closure(build, by["lcm"]) == {"teacher", "text-encoder", "vae", "data-cache"}


def test_a_unit_every_other_one_needs_starts_beside_running_units_only_when_waiting_costs_more(tmp_path, monkeypatch):
    preset = load_preset("tiny").model_copy(update={"threads": 2})
    build = WorldBuild(preset, tmp_path / "work", models_dir=tmp_path / "models", log=lambda m: None)
    assert build_jobs.slowdown(build, 2) == 1.0
    assert build_jobs.slowdown(build, 1) == pytest.approx(2 / build_jobs.PARALLEL_GAIN)
    adapter = build.by_name["adapter"]
    monkeypatch.setattr(build, "estimate", lambda unit: 600.0)  # 10 minutes on both threads, 16 on one
    assert build_jobs.start_beside(build, adapter, [3000.0], threads=1)  # a CM ControlNet with 50 min left: start now
    assert build_jobs.start_beside(build, adapter, [60.0, 3000.0], threads=1)  # the longest running unit decides
    assert not build_jobs.start_beside(build, adapter, [60.0], threads=1)  # one minute left: wait, then both threads
    assert not build_jobs.start_beside(build, adapter, [3000.0, None], threads=1)  # a running unit of unknown length
    assert not build_jobs.start_beside(build, adapter, [], threads=1)
    monkeypatch.setattr(build, "estimate", lambda unit: None)  # no measured s/step: the old rule, wait
    assert not build_jobs.start_beside(build, adapter, [3000.0], threads=1)


def test_a_unit_whose_child_still_runs_is_not_done_for_the_units_that_need_it(tmp_path, monkeypatch):
    """The pack installs its models (and so reads as done) before its load check ends: the evals that
    need it start only once its process has exited, so a pack that fails its last check starts nothing."""
    lines: list[str] = []
    build = WorldBuild(load_preset("tiny"), tmp_path / "work", models_dir=tmp_path / "models", log=lines.append)
    units = [build.by_name["pack"], *[u for u in build.units if u.kind == "eval"]]
    assert len(units) > 1
    launched: set[str] = set()

    def command(build, unit, preset_file):
        launched.add(unit.name)
        return [sys.executable, "-c", "import time; time.sleep(1.5)" if unit.name == "pack" else "pass"]

    monkeypatch.setattr(build_jobs, "child_command", command)
    selected = {u.name for u in units}
    monkeypatch.setattr(build, "state", lambda unit: "done" if unit.name in launched or unit.name not in selected else "pending")
    build_jobs.run_jobs(build, units, jobs=2)
    pack_built = next(i for i, line in enumerate(lines) if line.strip().startswith("pack: built in"))
    first_eval = next(i for i, line in enumerate(lines) if ": started (job" in line and "pack" not in line)
    assert pack_built < first_eval, lines
