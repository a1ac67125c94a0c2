"""A build's progress kept in a folder that outlives the machine (one committed to version control, say).

A work dir holds gigabytes (the data cache, two checkpoints a stage); the archive keeps only what
another machine needs to carry on from where this one stopped:

- a finished unit: its folder without ``checkpoints/`` (the product, the done-marker, validation
  samples, loss curve);
- an unfinished trainer unit: the same, plus its last checkpoint, from which the next run resumes
  exactly (checkpoints restore every random stream);
- an unfinished eval unit: its folder with the cells it finished (``progress/``), which the next
  run reuses.

The data cache and the pack are not archived: the cache is rebuilt deterministically from the
archived VAE, the pack lives in ``ccm_world/models``. Each
unit is written under a temporary name and renamed into place, so an interrupted save leaves the
previous copy whole. A unit is only restored when its fingerprint matches this build's and it is
further along than the work dir's copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ccm_sdk.utils.atomic import atomic_folder

from .config import BuildError
from .markers import DONE, STARTED, read_marker

if TYPE_CHECKING:
    from .run import WorldBuild
    from .stages import Unit

ARCHIVED_KINDS = ("text-encoder", "trainer", "feature-net", "map-net", "eval")
RESUMABLE_KINDS = ("trainer", "eval")  # kinds whose unfinished units are archived with their progress
CHECKPOINTS = "checkpoints"


def _copy_unit(source: Path, target: Path, checkpoint: Path | None) -> None:
    """``source`` without its checkpoints (plus ``checkpoint``, if given) into ``target``, atomically."""
    with atomic_folder(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=lambda folder, names: [n for n in names if n.startswith(".") or
                        (Path(folder) == source and n == CHECKPOINTS)])  # fmt: skip
        if checkpoint is not None:
            shutil.copytree(checkpoint, tmp / CHECKPOINTS / checkpoint.name)


def _last_checkpoint(folder: Path) -> tuple[int, Path | None]:
    from ccm_sdk.training import list_checkpoints

    found = list_checkpoints(folder / CHECKPOINTS)
    return found[-1] if found else (0, None)


def progress(unit: Unit, folder: Path) -> tuple[int, Path | None]:
    """How far the unfinished ``unit`` in ``folder`` got, and the checkpoint that carries it: a
    trainer's last checkpoint step, or the number of cells an eval finished (carried by its folder)."""
    if unit.kind == "trainer":
        return _last_checkpoint(folder)
    if unit.kind == "eval":
        from ccm_sdk.eval.progress import ROW

        from .stages import EVAL_PROGRESS

        return sum(1 for cell in (folder / EVAL_PROGRESS).glob("*") if (cell / ROW).is_file()), None
    return 0, None


def describe_progress(unit: Unit, amount: int) -> str:
    return (f"{amount} cell" + ("s" if amount != 1 else "")) if unit.kind == "eval" else f"step {amount}"


def save_unit(build: WorldBuild, unit: Unit, archive: Path) -> str | None:
    """Copy ``unit``'s progress into ``archive/<unit>``: ``"done"``, ``"partial@<step>"``, or None (nothing to keep)."""
    if unit.kind not in ARCHIVED_KINDS:
        return None
    state, folder = build.state(unit), build.folder(unit)
    if state == "done":
        kept = read_marker(archive / unit.name, DONE)
        if kept is not None and kept.get("fingerprint") == build.fingerprint(unit):
            return None  # archived already
        _copy_unit(folder, archive / unit.name, None)
        return "done"
    if state != "partial" or unit.kind not in RESUMABLE_KINDS or read_marker(folder, STARTED) is None:
        return None
    step, checkpoint = progress(unit, folder)
    if (unit.kind == "trainer" and checkpoint is None) or step <= _archived_step(build, unit, archive):
        return None
    _copy_unit(folder, archive / unit.name, checkpoint)
    return f"partial@{step}"


def _archived_step(build: WorldBuild, unit: Unit, archive: Path) -> int:
    """The step of this build's run of ``unit`` that ``archive`` holds (0 when none or another run's)."""
    started = read_marker(archive / unit.name, STARTED)
    if started is None or started.get("fingerprint") != build.fingerprint(unit):
        return 0
    return progress(unit, archive / unit.name)[0]


def archived_state(build: WorldBuild, unit: Unit, archive: Path) -> str | None:
    """``"archived"`` (finished there) or ``"archived (step N)"`` / ``"archived (N cells)"`` (unfinished
    there) when the archive is further along than the work dir with this build's run of ``unit``; else None."""
    if build.state(unit) == "done":
        return None
    done = read_marker(archive / unit.name, DONE)
    if done is not None and done.get("fingerprint") == build.fingerprint(unit):
        return "archived"
    step = _archived_step(build, unit, archive)
    return f"archived ({describe_progress(unit, step)})" if step > _work_step(build, unit) else None


def restore_unit(build: WorldBuild, unit: Unit, archive: Path) -> str | None:
    """Replace the work dir's copy of ``unit`` with the archive's when that is this build's and further along."""
    kept = archive / unit.name
    if unit.kind not in ARCHIVED_KINDS or not kept.is_dir() or build.state(unit) == "done":
        return None
    done = read_marker(kept, DONE)
    if done is not None and done.get("fingerprint") == build.fingerprint(unit):
        if not (kept / unit.product).exists():
            raise BuildError(f"the archive's {unit.name!r} has a done-marker but no {unit.product!r}: {kept} is incomplete")
        _copy_unit(kept, build.folder(unit), None)
        return "done"
    step = _archived_step(build, unit, archive)
    if step > _work_step(build, unit):
        _copy_unit(kept, build.folder(unit), progress(unit, kept)[1])
        return f"partial@{step}"
    return None


def _work_step(build: WorldBuild, unit: Unit) -> int:
    """How far the work dir's run of ``unit`` got (0 when it holds another config's or nothing)."""
    return progress(unit, build.folder(unit))[0] if build.state(unit) == "partial" else 0
