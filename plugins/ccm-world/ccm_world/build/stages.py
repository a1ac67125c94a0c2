"""The stages of the world build: what each one trains, from which inputs, with which config.

A stage unit is one resumable piece of work with one output folder under the work directory;
the ControlNet stages expand to one unit per condition (``dm-controlnet-sketch``, ...), so every
unit fits in about an hour of a 2-core CPU. ``run_*`` functions do a unit's work and return what
its done-marker records.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccm_sdk.errors import InputError

from .config import BuildError, Preset, find_file
from ..dataset import ATTRIBUTE_NAMES, WorldDataset
from ..vocabulary import WORLD_VOCABULARY

Log = Callable[[str], None]

GROUPS = ("text-encoder", "vae", "data-cache", "teacher", "lcm", "dm-controlnets", "cm-controlnets", "adapter", "feature-net",
          "depth-net", "pose-net", "pack", "eval", "adapter-eval", "analysis-eval")  # fmt: skip
EVALS = ("eval", "adapter-eval", "analysis-eval")
EVAL_PROGRESS = "progress"  # an eval unit's finished cells, in its folder
# the world's map nets: unit -> (the control map it predicts, channels predicted)
MAP_NETS = {"depth-net": ("depth", 1), "pose-net": ("pose", 3)}
# where each kind of unit leaves its product, relative to the unit's folder
PRODUCT = {
    "text-encoder": ".", "vae": "vae", "t2i": "model", "lcd": "lcm", "dm_controlnet": "controlnet",
    "ct_controlnet": "controlnet", "adapter": "adapter", "feature-net": "feature-net", "eval": ".",
    "data-cache": "cache",
}  # fmt: skip
# keys the build sets itself; a preset setting them would silently unhook a stage from its inputs
RESERVED = (
    "output_dir", "model", "vae", "text_encoder", "unet", "condition", "condition_options", "controlnet", "controlnets",
    "data.path", "data.control_key", "train.seed", "checkpoint.resume",
)  # fmt: skip


@dataclass(frozen=True)
class Unit:
    """One resumable piece of the build."""

    name: str  # e.g. "dm-controlnet-sketch"
    group: str  # e.g. "dm-controlnets" (a name of GROUPS)
    kind: str  # "text-encoder", "trainer", "data-cache", "feature-net", "map-net", "pack" or "eval"
    trainer: str | None = None
    condition: str | None = None
    needs: tuple[str, ...] = ()

    @property
    def section(self) -> str:
        """The preset field describing this unit."""
        return self.group.replace("-", "_")

    @property
    def product(self) -> str:
        return self.name if self.kind == "map-net" else PRODUCT.get(self.trainer or self.kind, ".")


def plan_units(preset: Preset) -> list[Unit]:
    """Every unit of the preset, in build order, with what each needs."""
    units = [Unit("text-encoder", "text-encoder", "text-encoder"), Unit("vae", "vae", "trainer", "vae")]
    cache: tuple[str, ...] = ()
    if preset.data_cache is not None:
        units.append(Unit("data-cache", "data-cache", "data-cache", needs=("vae",)))
        cache = ("data-cache",)
    units.append(Unit("teacher", "teacher", "trainer", "t2i", needs=("text-encoder", "vae", *cache)))
    units.append(Unit("lcm", "lcm", "trainer", "lcd", needs=("teacher", *cache)))
    for c in preset.dm_controlnets.conditions:
        units.append(Unit(f"dm-controlnet-{c}", "dm-controlnets", "trainer", "dm_controlnet", c, needs=("teacher", *cache)))
    from_dm = preset.cm_controlnets.init == "dm-controlnet"
    for c in preset.cm_controlnets.conditions:
        needs = ("lcm", f"dm-controlnet-{c}") if from_dm else ("lcm",)
        units.append(Unit(f"cm-controlnet-{c}", "cm-controlnets", "trainer", "ct_controlnet", c, needs=(*needs, *cache)))
    adapter_needs = ("lcm", *(f"dm-controlnet-{c}" for c in preset.adapter.conditions), *cache)
    units.append(Unit("adapter", "adapter", "trainer", "adapter", needs=adapter_needs))
    units.append(Unit("feature-net", "feature-net", "feature-net", needs=cache))
    for name in MAP_NETS:
        if getattr(preset, name.replace("-", "_")) is not None:
            units.append(Unit(name, name, "map-net", needs=cache))
    packed = tuple(u.name for u in units if u.name not in ("text-encoder", "vae", "data-cache"))
    units.append(Unit("pack", "pack", "pack", needs=packed))
    for name in EVALS:
        if getattr(preset, name.replace("-", "_")) is not None:
            units.append(Unit(name, name, "eval", needs=("pack",)))
    return units


def stage_seconds(preset: Preset, unit: Unit) -> tuple[float | None, int | None]:
    """(measured s/step, steps) of a training unit from the preset; (None, None) for the others."""
    section = getattr(preset, unit.section, None)
    if unit.kind == "data-cache" and section is not None:
        return section.seconds_per_scene, preset.data.length  # a "step" is one scene
    if unit.kind not in ("trainer", "feature-net", "map-net") or section is None:
        return None, None
    steps = section.max_steps
    per_condition = getattr(section, "per_condition", {}).get(unit.condition, {}) if unit.condition else {}
    if "max_steps" in (per_condition.get("train") or {}):
        steps = per_condition["train"]["max_steps"]
    return section.seconds_per_step, steps


# --- trainer units ---------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def _has_key(mapping: dict[str, Any], dotted: str) -> bool:
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def condition_options(preset: Preset, condition: str) -> dict[str, Any]:
    return {"factor": preset.data.sr_factor} if condition == "sr" else {}


def trainer_config(preset: Preset, unit: Unit, work_dir: Path):
    """The validated trainer config of a training unit: the build's keys, then the preset's."""
    from ccm_sdk.training import config_class, validate_config

    stage = getattr(preset, unit.section)
    where = f"{unit.section}.config"
    for key in RESERVED:
        if _has_key(stage.config, key):
            raise BuildError(f"{where}.{key} is set by the build (it wires the stage to its inputs); remove it from the preset")
    folder = work_dir / unit.name
    base: dict[str, Any] = {
        "output_dir": str(folder),
        "train": {"seed": stage.seed, **({"num_threads": preset.threads} if preset.threads else {})},
        "checkpoint": {"resume": True},
        "log": {"progress": preset.progress},
    }
    teacher, lcm = work_dir / "teacher" / "model", work_dir / "lcm" / "lcm"
    if unit.trainer == "t2i":
        base.update(vae=str(work_dir / "vae" / "vae"), text_encoder=str(work_dir / "text-encoder"))
    elif unit.trainer == "lcd":
        base["model"] = str(teacher)
    elif unit.trainer in ("dm_controlnet", "ct_controlnet"):
        c = unit.condition
        base.update(model=str(teacher if unit.trainer == "dm_controlnet" else lcm), condition=c,
                    condition_options=condition_options(preset, c), data={"control_key": c})  # fmt: skip
        if unit.trainer == "ct_controlnet" and preset.cm_controlnets.init == "dm-controlnet":
            base["controlnet"] = str(work_dir / f"dm-controlnet-{c}" / "controlnet")
    elif unit.trainer == "adapter":
        base["model"] = str(lcm)
        base["controlnets"] = [
            {"path": str(work_dir / f"dm-controlnet-{c}" / "controlnet"), "condition": c, "control_key": c,
             "condition_options": condition_options(preset, c)}
            for c in preset.adapter.conditions
        ]  # fmt: skip
    raw = _merge(base, stage.config)
    if unit.condition is not None and unit.condition in getattr(stage, "per_condition", {}):
        raw = _merge(raw, stage.per_condition[unit.condition])
    raw["trainer"] = unit.trainer
    try:
        return validate_config(config_class(unit.trainer), raw)
    except InputError as exc:
        raise BuildError(f"stage {unit.name!r} ({where} in the preset): {exc}") from None


def unit_conditions(preset: Preset, unit: Unit) -> tuple[str, ...]:
    """The control maps a unit's training data must carry."""
    if unit.condition is not None:
        return (unit.condition,)
    if unit.trainer == "adapter":
        return tuple(preset.adapter.conditions)
    return ()


def world_data(preset: Preset, conditions: tuple[str, ...] = (), *, seed_offset: int = 0, length: int | None = None,
               grounding: bool = False) -> WorldDataset:  # fmt: skip
    d = preset.data
    return WorldDataset(size=d.size, length=length or d.length, seed=d.seed + seed_offset, conditions=conditions, sr_factor=d.sr_factor,
                        grounding=grounding)  # fmt: skip


def teacher_grounding(preset: Preset) -> bool:
    """Whether the teacher trains with t2i's grounding loss (its data, and then the data cache, carry the regions)."""
    return float(preset.teacher.config.get("grounding_weight") or 0.0) > 0


def cache_conditions(preset: Preset) -> tuple[str, ...]:
    """Every control map a stage reading the data cache needs."""
    maps = tuple(target for name, (target, _) in MAP_NETS.items() if getattr(preset, name.replace("-", "_")) is not None)
    return tuple(dict.fromkeys([*preset.dm_controlnets.conditions, *preset.cm_controlnets.conditions, *preset.adapter.conditions, *maps]))


def training_data(preset: Preset, unit: Unit, work_dir: Path, conditions: tuple[str, ...] | None = None):
    """A unit's training scenes: from the data cache when the unit reads it, else rendered at each step."""
    conditions = unit_conditions(preset, unit) if conditions is None else conditions
    grounding = unit.name == "teacher" and teacher_grounding(preset)
    if "data-cache" in unit.needs:
        from .data_cache import CachedWorldDataset

        return CachedWorldDataset(work_dir / "data-cache" / "cache", conditions, grounding=grounding)
    return world_data(preset, conditions, grounding=grounding)


def _intervals(starts: list[float]) -> float | None:
    """Median seconds between consecutive step starts, the first (warm-up) interval left out."""
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    gaps = gaps[1:] if len(gaps) > 1 else gaps
    return statistics.median(gaps) if gaps else None


def run_trainer(preset: Preset, unit: Unit, work_dir: Path, log: Log) -> dict[str, Any]:
    """Train (or resume) one unit with its SDK trainer; time its steps."""
    from ccm_sdk.training import get_trainer, list_checkpoints

    config = trainer_config(preset, unit, work_dir)
    found = list_checkpoints(Path(config.output_dir) / "checkpoints")
    resumed = found[-1][0] if found else 0
    if resumed:
        log(f"    resuming {unit.name} from its checkpoint at step {resumed} of {config.train.max_steps}")
    trainer = get_trainer(unit.trainer)(config, dataset=training_data(preset, unit, work_dir))
    starts: list[float] = []
    step = trainer.training_step

    def timed(*args, **kwargs):
        starts.append(time.perf_counter())
        return step(*args, **kwargs)

    trainer.training_step = timed  # the loop looks the method up on the instance
    result = trainer.train()
    return {
        "steps": config.train.max_steps,
        "resumed_from": resumed,
        "final_loss": result.final_loss,
        "seconds_per_step": _intervals(starts),
    }


def export_preview(preset: Preset, unit: Unit, work_dir: Path, log: Log) -> tuple[int, Path]:
    """The product of the unfinished trainer ``unit`` as of its last checkpoint (step, folder), exported
    once into ``<work>/pack/previews/<unit>/step-N`` (outside the unit's folder, so it is not archived)."""
    from ccm_sdk.training import get_trainer, list_checkpoints

    config = trainer_config(preset, unit, work_dir)
    found = list_checkpoints(Path(config.output_dir) / "checkpoints")
    if not found:
        raise BuildError(f"stage {unit.name!r} has no checkpoint to preview")
    step, checkpoint = found[-1]
    target = work_dir / "pack" / "previews" / unit.name / checkpoint.name
    if not (target / unit.product).exists():
        log(f"    {unit.name}: exporting a preview from its checkpoint at step {step} of {config.train.max_steps}")
        get_trainer(unit.trainer)(config, dataset=training_data(preset, unit, work_dir)).export_checkpoint(checkpoint, target)
    return step, target / unit.product


# --- the other units -------------------------------------------------------------------


def run_text_encoder(preset: Preset, unit: Unit, work_dir: Path, log: Log) -> dict[str, Any]:
    from ccm_sdk.training import build_text_encoder

    s = preset.text_encoder
    build_text_encoder(list(WORLD_VOCABULARY), work_dir / unit.name, hidden_size=s.hidden_size, layers=s.layers,
                       heads=s.heads, max_length=s.max_length, seed=s.seed)  # fmt: skip
    return {"words": len(WORLD_VOCABULARY)}


def stage_device(preset: Preset) -> str:
    """The device of the preset's non-trainer stages; an error when CUDA is asked for and missing."""
    import torch

    if preset.device == "cuda" and not torch.cuda.is_available():
        raise BuildError("the preset's device is cuda, but torch sees no CUDA device here; use device: auto or cpu")
    return "cuda" if preset.device == "cuda" or (preset.device == "auto" and torch.cuda.is_available()) else "cpu"


def _step_log(preset: Preset, name: str, steps: int, log: Log) -> tuple[Callable[[dict[str, Any]], None], list[float]]:
    """A per-step callback for the small nets' training loops: a log line every tenth of the run, and step start times."""
    import torch

    if preset.threads:
        torch.set_num_threads(preset.threads)
    starts: list[float] = []
    every = max(1, steps // 10)

    def progress(entry: dict[str, Any]) -> None:
        starts.append(time.perf_counter())
        if preset.progress and (entry["step"] + 1) % every == 0:
            log(f"    {name} step {entry['step'] + 1}/{steps}: loss {entry['loss']:.4f}")

    return progress, starts


def run_data_cache(preset: Preset, unit: Unit, work_dir: Path, log: Log) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL

    from .data_cache import build_data_cache

    if preset.threads:
        torch.set_num_threads(preset.threads)
    s = preset.data_cache
    vae = AutoencoderKL.from_pretrained(work_dir / "vae" / "vae").eval().to(stage_device(preset))
    started = time.perf_counter()
    build_data_cache(world_data(preset, cache_conditions(preset), grounding=teacher_grounding(preset)), vae, work_dir / unit.name / unit.product,
                     chunk=s.chunk, batch_size=s.batch_size, workers=s.num_workers, log=log)  # fmt: skip
    return {"scenes": preset.data.length, "seconds_per_scene": (time.perf_counter() - started) / preset.data.length}


def run_feature_net(preset: Preset, unit: Unit, work_dir: Path, log: Log) -> dict[str, Any]:
    from ccm_sdk.eval.feature_net import train_feature_net

    s = preset.feature_net
    progress, starts = _step_log(preset, unit.name, s.steps, log)
    result = train_feature_net(
        training_data(preset, unit, work_dir), steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed, holdout=s.holdout,
        num_workers=s.num_workers, label_names=ATTRIBUTE_NAMES, output_dir=work_dir / unit.name / unit.product,
        log=progress, widths=s.widths, feature_dim=s.feature_dim, device=stage_device(preset),
    )  # fmt: skip
    return {"steps": s.steps, "heldout_accuracy": result.accuracy, "final_loss": result.losses[-1],
            "seconds_per_step": _intervals(starts)}  # fmt: skip


def run_map_net(preset: Preset, unit: Unit, work_dir: Path, log: Log) -> dict[str, Any]:
    from ..map_net import train_map_net

    s, (target, channels) = getattr(preset, unit.section), MAP_NETS[unit.name]
    progress, starts = _step_log(preset, unit.name, s.steps, log)
    result = train_map_net(
        training_data(preset, unit, work_dir, (target,)), target=target, channels=channels, foreground_weight=s.foreground_weight,
        steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed, holdout=s.holdout, num_workers=s.num_workers,
        device=stage_device(preset), output_dir=work_dir / unit.name / unit.product, log=progress, widths=s.widths,
    )  # fmt: skip
    return {"steps": s.steps, "heldout_l1": result.holdout_l1, "final_loss": result.losses[-1], "seconds_per_step": _intervals(starts)}


# which ControlNets each preset method of the eval runs
_USES = {"dm_controlnets": ("dm-controlnet+dm", "dm-controlnet+cm", "dm-controlnet+cm+adapter"),
         "cm_controlnets": ("cm-controlnet+cm", "cm-controlnet+dm")}  # fmt: skip


def eval_config_text(config: str) -> Any:
    """The eval config file ``config`` as data (comments and layout left out): what an eval stage's result depends on.
    None when the file is missing (:func:`eval_config` turns that into its error)."""
    import yaml

    path = find_file(config)
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def eval_config(preset: Preset, models_dir: Path, output_dir: Path, section: str = "eval"):
    """The eval config of the preset's ``section`` (``eval`` or ``adapter_eval``) with the packed models as the paper's models."""
    from ccm_sdk.eval import load_eval_config

    s = getattr(preset, section)
    raw = eval_config_text(s.config)
    if raw is None:
        raise BuildError(f"{section}.config {s.config!r} does not exist")
    dataset = dict(raw.get("dataset") or {})
    if dataset.get("path") is None:  # the world, by name or factory: scenes at the models' size
        dataset["options"] = {**(dataset.get("options") or {}), "size": preset.data.size, "sr_factor": preset.data.sr_factor}
    raw["dataset"] = dataset
    raw["features"] = {**(raw.get("features") or {}), "kind": "feature-net", "path": str(models_dir / "feature-net")}
    methods = [m for m in raw.get("methods") or [] if isinstance(m, str)]
    used = [name for name, users in _USES.items() if any(m in users for m in methods)]
    nets: dict[str, dict[str, str]] = {"dm_controlnets": {}, "cm_controlnets": {}}
    for condition in raw.get("conditions") or []:
        for unit, (target, _) in MAP_NETS.items():
            if condition["name"] == f"world-{target}":  # h is the packed map net, wherever the pack went
                if getattr(preset, unit.replace("-", "_")) is None:
                    raise BuildError(f"the eval config's world-{target} condition needs the {unit} stage ({unit.replace('-', '_')} in the preset)")
                condition["options"] = {"model": str(models_dir / unit), **(condition.get("options") or {})}
        label = condition.get("label") or condition["name"]
        key = condition.get("key") or condition["name"]
        for name in used:
            nets[name][label] = str(models_dir / f"{name[:2]}-controlnet-{key}")
        missing = [name for name in used if key not in getattr(preset, name).conditions]
        if missing:
            raise BuildError(f"the eval config's condition {label!r} needs a {key!r} ControlNet in {' and '.join(missing)}.conditions")
    raw["paper"] = {**(raw.get("paper") or {}), "dm": str(models_dir / "teacher"), "cm": str(models_dir / "lcm"),
                    **nets, "adapter": str(models_dir / "adapter"), **s.paper}  # fmt: skip
    keys = {c.get("label") or c["name"]: c.get("key") or c["name"] for c in raw.get("conditions") or []}
    for analysis in raw.get("correlation") or []:  # the DM's ControlNet (a) against the CM's (b), on the CM
        key = keys.get(analysis.get("condition"), analysis.get("condition"))
        analysis.update(model=str(models_dir / "lcm"), controlnet_a=str(models_dir / f"dm-controlnet-{key}"),
                        controlnet_b=str(models_dir / f"cm-controlnet-{key}"))  # fmt: skip
    raw.update(s.overrides)
    raw["output_dir"] = str(output_dir)
    try:
        return load_eval_config(raw)
    except InputError as exc:
        raise BuildError(f"{section.replace('_', '-')} stage: {exc}") from None


def run_eval(preset: Preset, unit: Unit, work_dir: Path, models_dir: Path, log: Log) -> dict[str, Any]:
    from ccm_sdk.eval import run_evaluation

    folder, stage = work_dir / unit.name, getattr(preset, unit.section)
    config = eval_config(preset, models_dir, folder, unit.section)
    # finished cells are kept in progress/, so a stopped eval (SIGTERM, --stop-after) goes on where it was
    result = run_evaluation(config, log=lambda message: log(f"    {message}"), progress=folder / EVAL_PROGRESS, resume=True)
    written = result.write(folder)
    if stage.results:
        target = Path(stage.results)
        target.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# Results: {stage.title}\n\nMade by `ccm-world build --preset {preset.name}` (stage `{unit.name}`) from the "
            f"models packed in `ccm_world/models`, with `{stage.config}`: {config.num_samples} scenes of world seed "
            f"{config.dataset.options.get('seed')} per condition, FID in the world feature net's features. "
            f"Regenerate with `ccm-world build --preset full --stage {unit.name} --force`.\n\n"
        )
        markdown = Path(written["markdown"]).read_text()
        figures = [Path(written["samples"]), Path(written["metrics"]), *map(Path, written["correlation"])]
        (target.parent / "images").mkdir(exist_ok=True)
        for figure in figures:  # beside the results file, so that its links work where it is read
            shutil.copyfile(figure, target.parent / "images" / f"{target.stem}-{figure.name}")
            markdown = markdown.replace(f"]({figure.name})", f"](images/{target.stem}-{figure.name})")
        write_results_file(target, header + markdown.removeprefix("# Evaluation results\n\n"))
    return {"rows": len(result.rows), "results": str(written["markdown"])}


DISCUSSION_MARKER = "<!-- written by hand: ccm-world build keeps everything below this line -->"


def write_results_file(target: Path, generated: str) -> None:
    """Write a stage's results file, keeping the hand-written discussion of an earlier one (after DISCUSSION_MARKER)."""
    kept = ""
    if target.is_file():
        earlier = target.read_text()
        if DISCUSSION_MARKER in earlier:
            kept = "\n" + earlier[earlier.index(DISCUSSION_MARKER):]
    target.write_text(generated.rstrip("\n") + "\n" + kept)
