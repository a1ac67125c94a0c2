"""Presets of the world build: every stage's sizes, seeds, step budgets and trainer-config keys.

A preset is a YAML file (``full`` and ``tiny`` ship in ``ccm_world/build/presets/``) validated
by :class:`Preset` (pydantic, unknown keys are errors). Trainer stages carry a ``config``
mapping of the trainer's own keys (``ccm train <trainer> --help``), laid over what the build
sets itself (paths, data, seed, resume), and validated by the trainer's config class.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ccm_sdk.errors import InputError

from ..vocabulary import MAX_CAPTION_TOKENS

WorldCondition = Literal["canny", "sketch", "hed", "depth", "pose", "mask", "sr"]
PRESET_DIR = Path(__file__).parent / "presets"  # package data: installed with the plugin


class BuildError(InputError):
    """A world build cannot go on: a bad preset, a stage missing its inputs, stale outputs."""


class PackSizeError(BuildError):
    """The packed models exceed the preset's size limit."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(Section):
    """The training scenes every stage draws (``WorldDataset``)."""

    size: int = Field(default=64, ge=16, description="image size in pixels")
    length: int = Field(default=100_000, ge=1, description="scenes in the training set (indices wrap into epochs)")
    seed: int = Field(default=0, description="world seed of the training scenes; checks and eval use seed + 1")
    sr_factor: int = Field(default=4, ge=1, description="the sr condition's downsampling factor")


class TextEncoderStage(Section):
    """``build_text_encoder`` over ``WORLD_VOCABULARY``: a frozen random CLIP text encoder."""

    hidden_size: int = Field(default=128, ge=8)
    layers: int = Field(default=2, ge=1)
    heads: int | None = Field(default=None, ge=1, description="None: hidden_size // 64 (at least 1)")
    max_length: int = Field(default=MAX_CAPTION_TOKENS, ge=MAX_CAPTION_TOKENS, description="padded prompt length")
    seed: int = 0


class TrainerStage(Section):
    """One run of an SDK trainer."""

    seed: int = Field(description="train.seed of the run (fixed per stage, so the build is deterministic)")
    seconds_per_step: float | None = Field(default=None, gt=0, description="measured s/step: the time estimate")
    config: dict[str, Any] = Field(default_factory=dict, description="trainer config keys over the build's")

    @property
    def max_steps(self) -> int | None:
        return (self.config.get("train") or {}).get("max_steps")


def _unique(conditions: list[str], where: str) -> None:
    repeated = sorted({c for c in conditions if conditions.count(c) > 1})
    if repeated:
        raise ValueError(f"{where} lists {repeated} more than once")


class ControlNetStage(TrainerStage):
    """One ControlNet per condition, each its own resumable unit (``<group>-<condition>``)."""

    conditions: list[WorldCondition] = Field(min_length=1)
    per_condition: dict[WorldCondition, dict[str, Any]] = Field(
        default_factory=dict, description="trainer config keys over ``config`` for one condition's unit only"
    )

    @model_validator(mode="after")
    def _no_repeats(self):
        _unique(self.conditions, "conditions")
        unknown = sorted(set(self.per_condition) - set(self.conditions))
        if unknown:
            raise ValueError(f"per_condition names {unknown}, which are not in conditions {self.conditions}")
        return self


class CMControlNetStage(ControlNetStage):
    init: Literal["unet", "dm-controlnet"] = Field(
        default="unet", description="unet: a copy of the LCM's encoder (the paper); dm-controlnet: the DM ControlNet"
    )


class AdapterStage(TrainerStage):
    conditions: list[WorldCondition] = Field(min_length=1, description="the DM ControlNets the adapter trains over")

    @model_validator(mode="after")
    def _no_repeats(self):
        _unique(self.conditions, "adapter.conditions")
        return self


class FeatureNetStage(Section):
    """``ccm_sdk.eval.train_feature_net`` on the world's attribute labels (no checkpoints: minutes)."""

    seed: int
    steps: int = Field(default=3000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    holdout: int = Field(default=256, ge=0)
    widths: tuple[int, ...] = (32, 64, 128, 128)
    feature_dim: int = Field(default=128, ge=1)
    num_workers: int = Field(default=0, ge=0)
    seconds_per_step: float | None = Field(default=None, gt=0)

    @property
    def max_steps(self) -> int:
        return self.steps


class MapNetStage(Section):
    """``ccm_world.map_net.train_map_net``: h for the Fidelity of a map no rule reads back (no checkpoints)."""

    seed: int
    steps: int = Field(default=3000, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    holdout: int = Field(default=256, ge=0)
    widths: tuple[int, ...] = (32, 64, 128)
    foreground_weight: float = Field(default=0.0, ge=0, description="extra L1 weight where the true map is not black (thin maps)")
    num_workers: int = Field(default=0, ge=0)
    seconds_per_step: float | None = Field(default=None, gt=0)

    @property
    def max_steps(self) -> int:
        return self.steps


class DataCacheStage(Section):
    """The scenes rendered once with their VAE posteriors (``ccm_world.build.data_cache``), for the ControlNet and adapter stages."""

    chunk: int = Field(default=5000, ge=1, description="scenes per chunk (the unit an interrupted build resumes at)")
    batch_size: int = Field(default=64, ge=1, description="scenes per VAE batch")
    num_workers: int = Field(default=1, ge=0, description="processes rendering while the VAE encodes (0: render in turn)")
    seconds_per_scene: float | None = Field(default=None, gt=0, description="measured render + encode time, for the plan")


class PackStage(Section):
    """Copy the models into ``ccm_world/models`` (hub layout), float16 where outputs hold."""

    max_megabytes: float = Field(default=60.0, gt=0, description="the packed folder's size limit (10^6 bytes)")
    fp16: bool = Field(default=True, description="store weights as float16 where the output check passes")
    fp16_tolerance: float = Field(default=0.01, ge=0, description="largest mean |image(fp16) - image(fp32)| kept as fp16")
    check_samples: int = Field(default=4, ge=1, description="images per output check")
    check_steps: int = Field(default=4, ge=1, le=8, description="consistency steps of the LCM checks")
    dm_check_steps: int = Field(default=10, ge=1, description="DDIM steps of the teacher check")


class EvalStage(Section):
    """The Table-2 eval config, pointed at the packed models."""

    config: str = Field(default="configs/eval/world_table2.yaml")
    title: str = Field(default="CCM's Table 2 on the world", description="the heading of the results file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="top-level eval config keys (num_samples, ...)")
    paper: dict[str, Any] = Field(default_factory=dict, description="paper keys besides the models (dm_steps, cm_steps, ...)")
    results: str | None = Field(
        default=None, description="also write results.md here (e.g. docs/results.md), its figures beside it in images/<stem>-*.png"
    )


class Preset(Section):
    """Everything one world build does."""

    name: str
    description: str = ""
    threads: int | None = Field(default=2, ge=1, description="torch CPU threads")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where the data cache, feature net and map nets run (auto: CUDA when there is one); "
        "the trainers follow their own train.device, auto by default"
    )  # fmt: skip
    progress: bool = Field(default=True, description="trainers' progress bars")
    data: DataSection = Field(default_factory=DataSection)
    text_encoder: TextEncoderStage = Field(default_factory=TextEncoderStage)
    vae: TrainerStage
    teacher: TrainerStage
    lcm: TrainerStage
    dm_controlnets: ControlNetStage
    cm_controlnets: CMControlNetStage
    adapter: AdapterStage
    feature_net: FeatureNetStage
    depth_net: MapNetStage | None = Field(default=None, description="the world's depth estimator; None: no depth Fidelity")
    pose_net: MapNetStage | None = Field(default=None, description="the world's pose estimator; None: no pose Fidelity")
    data_cache: DataCacheStage | None = Field(
        default=None, description="render and encode the scenes once for the ControlNet and adapter stages; None: every step renders"
    )
    pack: PackStage = Field(default_factory=PackStage)
    eval: EvalStage | None = None
    adapter_eval: EvalStage | None = Field(default=None, description="a second eval after the first (the adapter on all seven conditions)")
    analysis_eval: EvalStage | None = Field(
        default=None, description="a third: the reverse transfer and the residual correlation of the DM's and CM's ControlNets"
    )

    @model_validator(mode="after")
    def _controlnets_exist(self):
        missing = [c for c in self.adapter.conditions if c not in self.dm_controlnets.conditions]
        if missing:
            raise ValueError(f"adapter.conditions {missing} have no DM ControlNet (dm_controlnets.conditions)")
        if self.cm_controlnets.init == "dm-controlnet":
            missing = [c for c in self.cm_controlnets.conditions if c not in self.dm_controlnets.conditions]
            if missing:
                raise ValueError(f"cm_controlnets.init is dm-controlnet, but {missing} have no DM ControlNet")
        return self


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<root>"
    if error["type"] == "extra_forbidden":
        model: type[BaseModel] | None = Preset
        for part in loc[:-1]:
            field = model.model_fields.get(part) if model is not None else None
            annotation = field.annotation if field is not None else None
            args = getattr(annotation, "__args__", ())
            model = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        accepted = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(loc[-1], accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{hint}; accepted there: {', '.join(accepted)}"
    if error["type"] == "missing":
        return f"{key!r} is required"
    if not loc or isinstance(error.get("input"), dict):  # a check across keys: the input is a whole section
        return f"{key}: {error['msg']}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def find_file(path: str | os.PathLike) -> Path:
    """``path`` as given, else relative to the repository this plugin lives in (editable installs:
    the presets name the repository's eval configs, ``configs/eval/...``)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    repo = Path(__file__).resolve().parents[4]
    return repo / path if (repo / path).exists() else path


def preset_path(source: str | os.PathLike) -> Path:
    """A preset name (``full``, ``tiny``: ``ccm_world/build/presets/<name>.yaml``) or a YAML file."""
    text = str(source)
    if not text.endswith((".yaml", ".yml", ".json")) and "/" not in text and os.sep not in text:
        path = PRESET_DIR / f"{text}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise BuildError(f"no world build preset {text!r} (looked for {str(path)!r}; presets: {', '.join(known) or 'none'})")
        return path
    path = Path(text)
    if not path.is_file():
        raise BuildError(f"world build preset file {text!r} does not exist")
    return path


def load_preset(source: str | os.PathLike | dict[str, Any], overrides: list[tuple[str, Any]] = ()) -> Preset:
    """Validate a preset (name, file or mapping) plus dotted ``(key, value)`` overrides."""
    from ccm_sdk.utils.config_files import read_config_file, set_path

    if isinstance(source, dict):
        raw, where = dict(source), "preset"
    else:
        path = preset_path(source)
        raw, where = read_config_file(path), f"preset {str(path)!r}"
    for key, value in overrides:
        set_path(raw, key.replace("-", "_").split("."), value)
    try:
        return Preset(**raw)
    except ValidationError as exc:
        raise BuildError(f"invalid world build {where}: " + "; ".join(_describe(e) for e in exc.errors())) from None
