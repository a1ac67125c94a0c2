"""Independent stages side by side: ``ccm-world build --jobs N``.

Most of a world build is units that need only the teacher or the LCM (seven DM ControlNets, five CM
ControlNets, the feature and map nets), and on a small CPU two one-thread trainers get through
more steps than one two-thread trainer: 1.25x on the project's 2-core AMD EPYC
(``benchmarks/bench_build_jobs.py``, 2026-12-06), as one trainer does not keep two threads busy.
With ``--jobs N`` the build starts each unit, in build order, as soon as every unit it needs is
done and fewer than N run, each in its own process (``--stage <unit>`` of the same build, the
same work dir, archive and models dir) with the preset's threads shared out between them. A unit
that every other unit left needs (the VAE, the data cache, the pack) gets every thread, since
nothing could run beside it: it waits until nothing else runs, unless the running units would
keep its threads idle for longer than its share of threads would cost it (``start_beside``: the
adapter beside a CM ControlNet with most of its steps left starts at once, the VAE beside the
text encoder's last minute waits).

A child is exactly a one-stage build, so everything a one-stage build guarantees holds: the same
fingerprints (threads and logging never enter them), its own done-marker, checkpoints and archive
copy, and the same resume. Each child writes its log to ``<work-dir>/<unit>/build-job.log``.
A time limit is handed to every child as the time left; SIGTERM or SIGUSR1 to the build is
passed on to the running children, which checkpoint and stop. Once any child stops early or
fails, no further unit starts; the running ones finish, then the build stops (``Interrupted``)
or fails (``BuildError`` naming the unit and its log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import yaml

from ccm_sdk.errors import Interrupted
from ccm_sdk.utils.atomic import write_text_atomic
from ccm_sdk.utils.stopping import SIGNALS, time_left, time_limit_reached

from .config import BuildError
from .markers import DONE, read_marker
from .report import StageReport, duration

if TYPE_CHECKING:
    from .run import WorldBuild
    from .stages import Unit

JOB_LOG = "build-job.log"
PRESET_FILE = "build-jobs-preset-{threads}-threads.yaml"
POLL_SECONDS = 0.5
# Steps an hour of N one-thread jobs against one N-thread job: 1.25 for two on the 2-core EPYC
# (benchmarks/bench_build_jobs.py, 2026-12-06), so a one-thread job runs 2 / 1.25 = 1.6x slower
# than the same unit on both threads.
PARALLEL_GAIN = 1.25


def total_threads(build: WorldBuild) -> int:
    return build.preset.threads or os.cpu_count() or 1


def job_threads(build: WorldBuild, jobs: int) -> int:
    """A child's torch threads beside others: the preset's threads (else the CPU count) shared out, at least one."""
    return max(1, total_threads(build) // jobs)


def needs_closure(build: WorldBuild, unit: Unit) -> set[str]:
    """Every unit ``unit`` needs, directly or through others."""
    seen: set[str] = set()
    stack = list(unit.needs)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(build.by_name[name].needs)
    return seen


def alone(build: WorldBuild, unit: Unit, pending: list[Unit]) -> bool:
    """True when every other pending unit needs ``unit``: nothing could run beside it, so it should have
    every thread (the VAE, the data cache, the pack: the chain the rest of the build hangs on)."""
    return all(unit.name in needs_closure(build, other) for other in pending if other.name != unit.name)


def slowdown(build: WorldBuild, threads: int) -> float:
    """How many times longer a unit takes on ``threads`` than on every thread (PARALLEL_GAIN's model)."""
    total = total_threads(build)
    return 1.0 if threads >= total else max(1.0, total / threads / PARALLEL_GAIN)


def start_beside(build: WorldBuild, unit: Unit, running_left: list[float | None], threads: int) -> bool:
    """For a unit that every pending unit needs, while others run: start it now on ``threads`` (True),
    or wait for the running units and give it every thread (False). Now, it ends after its estimate x
    slowdown(threads); waiting, after the longest running unit's time left plus its estimate. Any
    estimate unknown (a stage without measured s/step, an eval, the pack): wait."""
    estimate = build.estimate(unit)
    if estimate is None or not running_left or any(left is None for left in running_left):
        return False
    return estimate * slowdown(build, threads) < max(running_left) + estimate  # type: ignore[type-var, operator]


def child_command(build: WorldBuild, unit: Unit, preset_file: Path) -> list[str]:
    """The one-stage build a child runs for ``unit``."""
    command = [sys.executable, "-m", "ccm_world.build", "--preset", str(preset_file), "--stage", unit.name,
               "--work-dir", str(build.work_dir), "--models-dir", str(build.installed_dir)]  # fmt: skip
    if build.archive is not None:
        command += ["--archive", str(build.archive)]
    left = time_left()
    if left is not None:
        command += ["--stop-after", f"{max(1.0, left):.0f}s"]
    return command


def write_child_preset(build: WorldBuild, threads: int) -> Path:
    """The build's preset (overrides included) with ``threads`` and no progress bars (a child writes to a
    log file); neither enters a fingerprint."""
    raw = build.preset.model_dump(mode="json")
    raw.update(threads=threads, progress=False)
    path = build.work_dir / PRESET_FILE.format(threads=threads)
    build.work_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(raw, sort_keys=False))
    return path


def _said_stopped(log: Path, start: int) -> bool:
    """Whether a child's log (from byte ``start``, where this child began writing) ends with the build's
    "stopped: ..." line (exit status 1 is also what an uncaught exception gives)."""
    with open(log, "rb") as f:
        f.seek(max(start, f.seek(0, os.SEEK_END) - 4096))
        tail = f.read().decode("utf-8", errors="replace")
    return any(line.startswith("stopped: ") for line in tail.splitlines()[-5:])


@contextmanager
def _forward_stop_signals(children: dict[str, subprocess.Popen], stopping: list[str]) -> Iterator[None]:
    """While the block runs, SIGTERM / SIGUSR1 to this process go on to every running child."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        stopping.append(f"signal {signal.Signals(signum).name}")
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_jobs(build: WorldBuild, units: list[Unit], jobs: int) -> list[StageReport]:
    """Build ``units`` (in build order) with up to ``jobs`` child processes at once."""
    selected = {unit.name for unit in units}
    for unit in units:  # restore everything first: two children must never restore the same unit at once
        for name in (*unit.needs, unit.name):
            build.restore(build.by_name[name])
    reports: dict[str, StageReport] = {}
    pending: list[Unit] = []
    for unit in units:
        state = build.state(unit)
        if state == "stale":
            raise build.stale_error(unit)
        missing = [n for n in unit.needs if n not in selected and build.state(build.by_name[n]) != "done"]
        if missing:
            raise build.missing_need_error(unit, missing[0])
        if state == "done":
            build.log(f"==> {unit.name}: done, skipped ({build._relative(build.output(unit))})")
            reports[unit.name] = StageReport(unit.name, "skipped", 0.0, build._relative(build.output(unit)))
        else:
            pending.append(unit)
    presets = {t: write_child_preset(build, t) for t in {job_threads(build, jobs), total_threads(build)}}
    children: dict[str, subprocess.Popen] = {}
    started: dict[str, tuple[float, int, int]] = {}  # unit: (start time, checkpoint step, log offset)
    expected: dict[str, float | None] = {}  # unit: seconds it was expected to take when it started
    stopping: list[str] = []
    failed: list[str] = []
    with _forward_stop_signals(children, stopping):
        try:
            while pending or children:
                while pending and len(children) < jobs and not stopping and not failed:
                    # a unit counts as done once its child has exited: the pack installs before its load check
                    # ends and a trainer marks itself done before its archive copy, and either may still fail
                    ready = next((u for u in pending if all(n not in children and build.state(build.by_name[n]) == "done"
                                                            for n in u.needs)), None)  # fmt: skip
                    if ready is None:
                        break
                    if time_limit_reached():
                        stopping.append("the time limit")
                        break
                    threads, why = job_threads(build, jobs), ""
                    if alone(build, ready, pending):
                        if not children:
                            threads, why = total_threads(build), ": the stages left need it"
                        else:
                            now = time.perf_counter()
                            left = [None if expected[n] is None else max(0.0, expected[n] - (now - started[n][0]))  # type: ignore[operator]
                                    for n in children]  # fmt: skip
                            if not start_beside(build, ready, left, threads):
                                break  # it gets every thread once the running units are done
                            why = ": the running stages would keep its threads idle longer than it gains from them"
                    pending.remove(ready)
                    folder = build.folder(ready)
                    folder.mkdir(parents=True, exist_ok=True)
                    with open(folder / JOB_LOG, "ab") as log_file:
                        started[ready.name] = (time.perf_counter(), build.checkpoint_step(ready), log_file.tell())
                        estimate = build.estimate(ready)
                        expected[ready.name] = None if estimate is None else estimate * slowdown(build, threads)
                        children[ready.name] = subprocess.Popen(child_command(build, ready, presets[threads]), stdout=log_file,
                                                                stderr=subprocess.STDOUT)  # fmt: skip
                    build.log(f"==> {ready.name}: started (job {len(children)} of {jobs}, {threads} thread(s){why}; "
                              f"log {build._relative(folder / JOB_LOG)})")  # fmt: skip
                if not children:
                    break  # nothing runs and nothing more may start
                time.sleep(POLL_SECONDS)
                for name, child in list(children.items()):
                    code = child.poll()
                    if code is None:
                        continue
                    del children[name]
                    seconds = time.perf_counter() - started[name][0]
                    log_path = build._relative(build.folder(build.by_name[name]) / JOB_LOG)
                    if code == 0:
                        marker = read_marker(build.folder(build.by_name[name]), DONE) or {}
                        resumed = started[name][1]
                        status = f"resumed@{resumed}" if resumed else "built"
                        reports[name] = StageReport(name, status, seconds, build._relative(build.output(build.by_name[name])),
                                                    marker.get("seconds_per_step"), marker.get("steps"))  # fmt: skip
                        build.log(f"    {name}: {status} in {duration(seconds)}")
                    elif code == 1 and _said_stopped(build.folder(build.by_name[name]) / JOB_LOG, started[name][2]):
                        stopping.append(name)
                        build.log(f"    {name}: stopped after {duration(seconds)}; its progress is kept ({log_path})")
                    else:
                        failed.append(name)
                        build.log(f"    {name}: failed (exit status {code}) after {duration(seconds)}; see {log_path}")
        except BaseException:  # Ctrl-C or an error here: the children get the same stop, and are waited for
            for child in children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children.values():
                child.wait()
            raise
    ordered = [reports[u.name] for u in units if u.name in reports]
    if failed:
        build.log(build.summary(ordered))
        logs = ", ".join(build._relative(build.folder(build.by_name[n]) / JOB_LOG) for n in failed)
        raise BuildError(f"stage(s) {', '.join(failed)} failed; their logs: {logs}")
    if stopping or pending:
        build.log(build.summary(ordered))
        why = stopping[0] if stopping else "a stage it needs did not finish"
        raise Interrupted(f"the build stopped ({why}) before {', '.join(u.name for u in pending) or 'every stage finished'}")
    build.log(build.summary(ordered))
    return ordered
