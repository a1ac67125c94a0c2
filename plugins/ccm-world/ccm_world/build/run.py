"""Rebuild the world's whole model stack from scratch with the SDK's own trainers, stage by stage
(:class:`WorldBuild`; the command line is in cli.py).

Stages, in order (docs/world.md): ``text-encoder``, ``vae``, ``data-cache``, ``teacher`` (t2i), ``lcm`` (lcd),
``dm-controlnets`` (one unit per condition, ``dm-controlnet-<c>``), ``cm-controlnets``
(``cm-controlnet-<c>``), ``adapter``, ``feature-net``, ``depth-net`` and ``pose-net`` (map nets, h for
Fidelity), ``pack`` (into ``ccm_world/models``), and ``eval`` and ``adapter-eval`` when the preset has them. Every unit writes into ``<work-dir>/<unit>/`` and ends
with a done-marker (``build-done.json``, written atomically after its outputs), so a rerun
skips it; an interrupted training unit resumes from its trainer's last checkpoint. Each unit's
fingerprint (its resolved config and its inputs' fingerprints) is recorded, so outputs of a
different preset are never mixed in silently. ``--archive DIR`` carries the progress to another
machine (archive.py); the markers are in markers.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ccm_sdk.errors import Interrupted
from ccm_sdk.utils.atomic import write_json_atomic
from ccm_sdk.utils.stopping import time_limit_reached

from ..vocabulary import WORLD_VOCABULARY
from .archive import RESUMABLE_KINDS, archived_state, describe_progress, progress, restore_unit, save_unit
from .config import BuildError, Preset
from .markers import DONE, STARTED, read_marker, write_marker
from .report import StageReport, duration
from .stages import (
    GROUPS,
    Log,
    Unit,
    eval_config,
    eval_config_text,
    export_preview,
    cache_conditions,
    plan_units,
    run_data_cache,
    teacher_grounding,
    run_eval,
    run_map_net,
    run_feature_net,
    run_text_encoder,
    run_trainer,
    stage_device,
    stage_seconds,
    trainer_config,
    unit_conditions,
)


def _print(message: str) -> None:
    print(message, flush=True)


# Trainer options added after units were built, at values that train exactly as before: left out of
# a unit's spec while they hold that value, so that adding them does not make finished units stale.
NEUTRAL_OPTIONS: dict[tuple[str, ...], Any] = {
    ("consistency", "boundary"): False,
    ("target_ema_decay",): 0.0,
    ("consistency", "pair_sampling"): "uniform",
    ("consistency", "lognormal_mean"): -1.1,
    ("consistency", "lognormal_std"): 2.0,
    ("consistency", "data_target_above"): 1000,
    ("consistency", "gap_ratio"): None,
    ("consistency", "weighting"): "uniform",
    ("consistency", "recipe"): "ccm",  # the recipe every consistency-trained unit was built with before recipes had names
    ("data", "dataset"): None,  # training data from a registered dataset; the build gives its trainers their data itself
    ("train_text_encoder",): False,  # t2i: the text encoder frozen, as every teacher before the option
    ("text_encoder_lr",): None,
    ("grounding_weight",): 0.0,  # t2i: no token-grounding loss
}


def _drop_neutral_options(config: dict[str, Any]) -> None:
    for path, neutral in NEUTRAL_OPTIONS.items():
        *parents, key = path
        section = config
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and key in section and section[key] == neutral:
            del section[key]


class WorldBuild:
    """One preset built into one work directory; ``run`` does (or resumes) the selected stages."""

    def __init__(self, preset: Preset, work_dir: str | os.PathLike = "outputs/world", *,
                 models_dir: str | os.PathLike | None = None, archive: str | os.PathLike | None = None,
                 log: Log = _print):  # fmt: skip
        self.preset, self.log = preset, log
        self.work_dir = Path(work_dir).resolve()  # trainer configs hold these paths
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else None
        self.archive = Path(archive).resolve() if archive is not None else None  # see archive.py
        self.units = plan_units(preset)
        self.by_name = {unit.name: unit for unit in self.units}
        stage_device(preset)  # a CUDA preset on a machine without CUDA fails now
        # every trainer and eval config is validated now, not hours into the build
        self.configs = {u.name: trainer_config(preset, u, self.work_dir) for u in self.units if u.kind == "trainer"}
        for unit in self.units:
            if unit.kind == "eval":
                eval_config(preset, self.installed_dir, self.folder(unit), unit.section)
        self._fingerprints: dict[str, str] = {}

    # --- where things are -----------------------------------------------------------------

    @property
    def installed_dir(self) -> Path:
        """Where ``pack`` installs: ``models_dir``, else the plugin's ``ccm_world/models`` (read now)."""
        import ccm_world

        return self.models_dir or Path(ccm_world.MODELS_DIR)

    def folder(self, unit: Unit) -> Path:
        return self.work_dir / unit.name

    def output(self, unit: Unit) -> Path:
        if unit.kind == "pack":
            return self.installed_dir
        return (self.folder(unit) / unit.product).resolve()

    @staticmethod
    def _relative(path: Path) -> str:
        """``path`` relative to the current directory when it lies below it."""
        try:
            return str(Path(path).resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    # --- identity and state ---------------------------------------------------------------

    def spec(self, unit: Unit, steps: int | None = None) -> dict[str, Any]:
        """What a unit's result depends on (not how it is logged, checkpointed, validated or threaded).

        ``steps`` replaces a trainer unit's ``max_steps``: the spec of the same run stopped there.
        """
        p = self.preset
        if unit.kind == "trainer":
            config = self.configs[unit.name].model_dump(mode="json")
            for key in ("log", "checkpoint", "hub", "validation"):
                config.pop(key, None)
            config["train"].pop("num_threads", None)
            if steps is not None:
                config["train"]["max_steps"] = steps
            config["data"].pop("num_workers", None)
            _drop_neutral_options(config)
            return {"config": config, "data": p.data.model_dump(), "conditions": list(unit_conditions(p, unit))}
        if unit.kind == "text-encoder":
            return {**p.text_encoder.model_dump(), "vocabulary": list(WORLD_VOCABULARY)}
        if unit.kind == "feature-net":
            return {**p.feature_net.model_dump(exclude={"seconds_per_step", "num_workers"}), "data": p.data.model_dump()}
        if unit.kind == "map-net":
            return {**getattr(p, unit.section).model_dump(exclude={"seconds_per_step", "num_workers"}), "data": p.data.model_dump()}
        if unit.kind == "data-cache":
            spec = {**p.data_cache.model_dump(exclude={"seconds_per_scene", "num_workers"}), "data": p.data.model_dump(), "conditions": list(cache_conditions(p))}
            if teacher_grounding(p):  # only when set: caches built before the option keep their fingerprint
                spec["grounding"] = True
            return spec
        if unit.kind == "pack":
            return p.pack.model_dump()
        spec = {**getattr(p, unit.section).model_dump(), "data": p.data.model_dump()}
        if unit.kind == "eval":  # what the eval config file says, not only its name
            spec["eval_config"] = eval_config_text(getattr(p, unit.section).config)
        return spec

    def fingerprint(self, unit: Unit, steps: int | None = None, *, regions: bool = True) -> str:
        """A hash of the unit's spec and its inputs' fingerprints; ``steps``: as if it stopped after that many.
        ``regions=False``: a data cache as the units that do not read its regions see it (the regions are
        files only the grounded teacher opens, so the others keep the fingerprint of a cache without them:
        the feature and map nets stay reusable from a version trained without grounding)."""
        key = (unit.name, steps, regions)
        if key not in self._fingerprints:
            needs = {name: self.fingerprint(self.by_name[name], regions=unit.name == "teacher") for name in unit.needs}
            spec = self.spec(unit, steps)
            if not regions and unit.kind == "data-cache":
                spec.pop("grounding", None)
            text = json.dumps({"unit": unit.name, "spec": spec, "needs": needs}, sort_keys=True)
            text = text.replace(str(self.work_dir), "<work>")
            self._fingerprints[key] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._fingerprints[key]

    def extendable(self, unit: Unit, marker: dict[str, Any]) -> bool:
        """True when ``marker`` records this very run stopped at fewer steps, under a learning rate that
        does not depend on max_steps: training on from its last checkpoint is then exactly the longer run
        (the data order is a function of the step)."""
        if unit.kind != "trainer" or self.configs[unit.name].train.lr_scheduler not in ("constant", "constant_with_warmup"):
            return False
        steps = marker.get("steps")
        if not isinstance(steps, int) or steps >= self.configs[unit.name].train.max_steps:
            return False
        return marker.get("fingerprint") == self.fingerprint(unit, steps) and self.checkpoint_step(unit) == steps

    def marker(self, unit: Unit, name: str) -> dict[str, Any] | None:
        return read_marker(self.folder(unit), name)

    def state(self, unit: Unit) -> str:
        """``done``, ``partial`` (started, or packed but not installed), ``stale`` (another config) or ``pending``."""
        from .pack import installed

        fingerprint = self.fingerprint(unit)
        done = self.marker(unit, DONE)
        if done is not None:
            if done.get("fingerprint") != fingerprint:
                # an evaluation runs again on another config: its cells check their own settings and are kept where unchanged
                return "partial" if unit.kind == "eval" or self.extendable(unit, done) else "stale"
            product = self.folder(unit) / ("models" if unit.kind == "pack" else unit.product)
            if not product.exists():
                return "pending"
            if unit.kind == "pack" and not installed(self.installed_dir, fingerprint):
                return "partial"
            return "done"
        started = self.marker(unit, STARTED)
        if started is not None:
            return "partial" if unit.kind == "eval" or started.get("fingerprint") == fingerprint else "stale"
        return "pending"

    def stale_error(self, unit: Unit) -> BuildError:
        return BuildError(
            f"stage {unit.name!r} in {self._relative(self.folder(unit))} was built from another preset or config; "
            f"use another --work-dir, or rebuild it with --force --stage {unit.name} (later stages that used it too). "
            "Only raising max_steps under a constant learning rate continues a built stage"
        )

    def missing_need_error(self, unit: Unit, need: str) -> BuildError:
        return BuildError(f"stage {unit.name!r} needs {need!r}, which is not built in {self._relative(self.work_dir)}; "
                          f"run with --until {unit.name}")  # fmt: skip

    def checkpoint_step(self, unit: Unit) -> int:
        from ccm_sdk.training import list_checkpoints

        found = list_checkpoints(self.folder(unit) / "checkpoints") if unit.kind == "trainer" else []
        return found[-1][0] if found else 0

    # --- selection and plan ---------------------------------------------------------------

    def select(self, stage: str | None = None, until: str | None = None) -> list[Unit]:
        """The units of ``stage`` (a unit or a group), or every unit up to ``until``, or all."""
        if stage is not None and until is not None:
            raise BuildError("give --stage or --until, not both")
        name = (stage or until or "").replace("_", "-")
        if not name:
            return list(self.units)
        matches = [i for i, u in enumerate(self.units) if name in (u.name, u.group)]
        if not matches:
            names = list(dict.fromkeys([g for g in GROUPS if any(u.group == g for u in self.units)] + [u.name for u in self.units]))
            raise BuildError(f"unknown stage {name!r}; stages: {', '.join(names)}")
        return [self.units[i] for i in matches] if stage else self.units[: matches[-1] + 1]

    def estimate(self, unit: Unit) -> float | None:
        """Seconds left for a unit by the preset's measured s/step (None when not measured)."""
        seconds_per_step, steps = stage_seconds(self.preset, unit)
        if seconds_per_step is None or steps is None:
            return None
        done = 0 if self.state(unit) == "stale" else self.checkpoint_step(unit)  # a stale unit is built again from scratch
        return seconds_per_step * max(0, steps - done)

    def plan(self, units: list[Unit]) -> str:
        rows = [("stage", "trainer", "steps", "s/step", "estimate", "status")]
        total, measured = 0.0, False
        for unit in units:
            seconds_per_step, steps = stage_seconds(self.preset, unit)
            state = self.state(unit)
            archived = archived_state(self, unit, self.archive) if self.archive is not None else None
            if archived:
                state = archived
            elif state == "partial" and unit.kind in RESUMABLE_KINDS:
                state = f"partial ({describe_progress(unit, progress(unit, self.folder(unit))[0])})"
            estimate = self.estimate(unit) if state not in ("done", "archived") else None
            total, measured = total + (estimate or 0.0), measured or seconds_per_step is not None
            shown = f"{seconds_per_step:.2f}" if seconds_per_step else "-"
            rows.append((unit.name, unit.trainer or unit.kind, str(steps or "-"), shown, duration(estimate), state))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
        if measured:
            lines.append(f"  estimated training time left: {duration(total)} (measured s/step x steps; loading and saving add a little)")
        return "\n".join(lines)

    # --- running --------------------------------------------------------------------------

    def run(self, *, stage: str | None = None, until: str | None = None, force: bool = False, jobs: int = 1) -> list[StageReport]:
        """Build (or resume, or skip) the selected units in order; print a summary. ``jobs`` > 1: units
        whose inputs are built run side by side, each in its own process (jobs.py)."""
        if jobs < 1:
            raise BuildError(f"jobs must be at least 1, got {jobs}")
        if jobs > 1 and force:
            raise BuildError("--force rebuilds stages one after another: run it without --jobs")
        units = self.select(stage, until)
        self.log(f"World build, preset {self.preset.name!r}: work dir {self._relative(self.work_dir)}, "
                 f"models -> {self._relative(self.installed_dir)}")  # fmt: skip
        self.log(self.plan(units))
        if jobs > 1:
            from .jobs import run_jobs

            return run_jobs(self, units, jobs)
        reports = []
        for position, unit in enumerate(units, start=1):
            if time_limit_reached() and self.state(unit) != "done":
                self.log(self.summary(reports))
                raise Interrupted(f"the time limit ran out before stage {unit.name!r}")
            reports.append(self.run_unit(unit, force=force, position=f"[{position}/{len(units)}]"))
        self.log(self.summary(reports))
        return reports

    def restore(self, unit: Unit) -> None:
        """Bring ``unit`` from the archive into the work dir when the archive is further along."""
        restored = restore_unit(self, unit, self.archive) if self.archive is not None else None
        if restored:
            self.log(f"    {unit.name}: restored ({restored}) from the archive {self._relative(self.archive)}")

    def save_archive(self) -> dict[str, str]:
        """Copy every unit's progress (finished units, the last checkpoint of unfinished ones) into the archive."""
        if self.archive is None:
            raise BuildError("no archive folder: give --archive DIR")
        saved = {}
        for unit in self.units:
            what = save_unit(self, unit, self.archive)
            if what:
                saved[unit.name] = what
                self.log(f"    {unit.name}: archived ({what}) in {self._relative(self.archive)}")
        if not saved:
            self.log(f"    nothing new to archive in {self._relative(self.archive)}")
        return saved

    def pack_partial(self) -> StageReport:
        """Pack and install the models built so far (at least the teacher and the LCM), and those of
        unfinished training stages as of their last checkpoint (previews, marked in the manifest).

        A preview of the full pack, so that the models already trained can be used before the
        whole build is done; the ``pack`` stage stays pending and replaces it when it runs.
        """
        from .pack import install, stage_pack, verify_installed

        unit = self.by_name["pack"]
        for name in unit.needs:
            self.restore(self.by_name[name])
        built = {name for name in unit.needs if self.state(self.by_name[name]) == "done"}
        missing = [name for name in ("teacher", "lcm") if name not in built]
        if missing:
            raise BuildError(f"a partial pack needs the teacher and the LCM built; not built: {', '.join(missing)}")
        previews = {}
        for name in unit.needs:
            need = self.by_name[name]
            if (name not in built and need.kind == "trainer" and self.state(need) == "partial" and self.checkpoint_step(need)
                    and all(self.state(self.by_name[n]) == "done" for n in need.needs)):  # fmt: skip
                previews[name] = export_preview(self.preset, need, self.work_dir, self.log)
        started = time.perf_counter()
        self.log(f"==> partial pack of {len(built)} of {len(unit.needs)} models"
                 + (f" and previews of {', '.join(f'{n} (step {s})' for n, (s, _) in previews.items())}" if previews else "")
                 + f" -> {self._relative(self.installed_dir)}")  # fmt: skip
        staging = self.folder(unit) / "partial"
        fingerprint = f"partial-{self.fingerprint(unit)}"
        info = stage_pack(self.preset, self.work_dir, staging, fingerprint, self.log, only=built, previews=previews)
        install(staging, self.installed_dir)
        verify_installed(self.preset, self.installed_dir, self.log)
        self.log(f"    partial pack: {info['models']} models installed in {duration(time.perf_counter() - started)}")
        return StageReport("pack", "partial", time.perf_counter() - started, self._relative(self.installed_dir))

    def run_unit(self, unit: Unit, *, force: bool = False, position: str = "") -> StageReport:
        from .pack import install, verify_installed

        folder, fingerprint = self.folder(unit), self.fingerprint(unit)
        for name in (*unit.needs, *(() if force else (unit.name,))):
            self.restore(self.by_name[name])
        state = self.state(unit)
        output = self._relative(self.output(unit))
        # 1. done, stale or forced
        if force and state != "pending":
            shutil.rmtree(folder, ignore_errors=True)
            state = "pending"
        if state == "stale":
            raise self.stale_error(unit)
        if state == "done":
            self.log(f"==> {position} {unit.name}: done, skipped ({output})")
            return StageReport(unit.name, "skipped", 0.0, output)
        # 2. its inputs must be built
        for name in unit.needs:
            if self.state(self.by_name[name]) != "done":
                raise self.missing_need_error(unit, name)
        started = time.perf_counter()
        seconds_per_step, steps = stage_seconds(self.preset, unit)
        detail = f"{unit.trainer}, {steps} steps" if unit.trainer else unit.kind
        self.log(f"==> {position} {unit.name} ({detail}; estimate {duration(self.estimate(unit))}) -> {output}")
        # 3. packed already, only not installed: install again
        if unit.kind == "pack" and self.marker(unit, DONE) is not None:
            install(folder / "models", self.installed_dir)
            verify_installed(self.preset, self.installed_dir, self.log)
            return StageReport(unit.name, "installed", time.perf_counter() - started, output)
        # 4. the work, between the started and the done markers
        folder.mkdir(parents=True, exist_ok=True)
        resumed = self.checkpoint_step(unit)
        (folder / DONE).unlink(missing_ok=True)  # a shorter run's marker, when this one extends it
        write_marker(folder, STARTED, {"unit": unit.name, "fingerprint": fingerprint, "preset": self.preset.name})
        try:
            info = self._work(unit, folder, fingerprint)
        except Interrupted:  # a trainer checkpointed the step it reached, an eval kept its finished cells: carry that too
            if self.archive is not None and save_unit(self, unit, self.archive):
                self.log(f"    {unit.name}: interrupted; its progress is archived in {self._relative(self.archive)}")
            raise
        seconds = time.perf_counter() - started
        write_marker(folder, DONE, {"unit": unit.name, "fingerprint": fingerprint, "preset": self.preset.name,
                                          "seconds": seconds, **info})  # fmt: skip
        if unit.kind == "pack":
            install(folder / "models", self.installed_dir)
            verify_installed(self.preset, self.installed_dir, self.log)
        if self.archive is not None and save_unit(self, unit, self.archive):
            self.log(f"    {unit.name}: archived in {self._relative(self.archive)}")
        status = f"resumed@{resumed}" if resumed else "built"
        self.log(f"    {unit.name}: {status} in {duration(seconds)}")
        return StageReport(unit.name, status, seconds, output, info.get("seconds_per_step"), info.get("steps"))

    def _work(self, unit: Unit, folder: Path, fingerprint: str) -> dict[str, Any]:
        from .pack import stage_pack

        if unit.kind == "trainer":
            return run_trainer(self.preset, unit, self.work_dir, self.log)
        if unit.kind == "text-encoder":
            return run_text_encoder(self.preset, unit, self.work_dir, self.log)
        if unit.kind == "data-cache":
            return run_data_cache(self.preset, unit, self.work_dir, self.log)
        if unit.kind == "feature-net":
            return run_feature_net(self.preset, unit, self.work_dir, self.log)
        if unit.kind == "map-net":
            return run_map_net(self.preset, unit, self.work_dir, self.log)
        if unit.kind == "pack":
            return stage_pack(self.preset, self.work_dir, folder / "models", fingerprint, self.log)
        return run_eval(self.preset, unit, self.work_dir, self.installed_dir, self.log)

    def summary(self, reports: list[StageReport]) -> str:
        rows = [("stage", "status", "time", "s/step", "output")]
        for r in reports:
            rows.append((r.unit, r.status, duration(r.seconds) if r.status != "skipped" else "-",
                         f"{r.seconds_per_step:.3f}" if r.seconds_per_step else "-", r.output))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["Summary:"] + ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.append(f"  {sum(r.status != 'skipped' for r in reports)} stage(s) run, {sum(r.status == 'skipped' for r in reports)} "
                     f"skipped, {duration(sum(r.seconds for r in reports))} in all")  # fmt: skip
        return "\n".join(lines)


# --- measuring the stages --------------------------------------------------------------


def measure_preset(preset: Preset, steps: int) -> Preset:
    """The preset with every training stage cut to ``steps`` timed steps (plus one warm-up and one last)."""
    raw = preset.model_dump()
    for name in ("vae", "teacher", "lcm", "dm_controlnets", "cm_controlnets", "adapter"):
        config = raw[name]["config"]
        config["train"] = {**config.get("train", {}), "max_steps": steps + 2}
        config["checkpoint"] = {**config.get("checkpoint", {}), "every": steps + 2}
    raw["feature_net"]["steps"] = steps + 2
    if raw.get("data_cache") is not None:  # cache enough scenes for the timed steps, not the whole world
        raw["data"]["length"] = min(raw["data"]["length"], max(1024, 64 * (steps + 2)))
    for name in ("depth_net", "pose_net"):
        if raw.get(name) is not None:
            raw[name]["steps"] = steps + 2
    return Preset(**raw)


def measure(
    preset: Preset, steps: int, work_dir: str | os.PathLike, *, until: str = "feature-net", log: Log = _print
) -> list[dict[str, Any]]:
    """Run every stage up to ``until`` for a few steps at full size; s/step per unit and the implied stage times."""
    build = WorldBuild(measure_preset(preset, steps), work_dir, models_dir=Path(work_dir) / "models", log=log)
    reports = {r.unit: r for r in build.run(until=until)}
    rows = []
    for unit in build.select(until=until):
        seconds_per_step, max_steps = stage_seconds(preset, unit)
        measured = reports[unit.name].seconds_per_step if unit.name in reports else None
        estimate = measured * max_steps if measured and max_steps else None
        rows.append({"stage": unit.name, "measured_seconds_per_step": measured, "preset_seconds_per_step": seconds_per_step,
                     "steps": max_steps, "estimate_seconds": estimate})  # fmt: skip
    lines = ["Measured (full-size steps on this machine):", "  stage                  s/step  preset  steps   estimate"]
    for row in rows:
        m, p = row["measured_seconds_per_step"], row["preset_seconds_per_step"]
        lines.append(f"  {row['stage']:<22} {f'{m:.3f}' if m else '-':>6}  {f'{p:.2f}' if p else '-':>6}  "
                     f"{row['steps'] or '-':>6}  {duration(row['estimate_seconds']):>9}")  # fmt: skip
    total = sum(r["estimate_seconds"] or 0 for r in rows)
    lines.append(f"  total training time at the preset's steps: {duration(total)}")
    log("\n".join(lines))
    write_json_atomic(Path(work_dir) / "measure.json", {"preset": preset.name, "steps": steps, "rows": rows})
    return rows
