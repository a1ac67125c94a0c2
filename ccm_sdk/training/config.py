"""Training configs: the sections every trainer shares, and loading from YAML/JSON files plus overrides.

Each trainer's own config class (a :class:`TrainConfig` subclass) sits beside the trainer, in its
module, and the trainer names it as ``config_class``; :func:`config_class` finds it by trainer name.

Every section forbids unknown keys; errors name the key and list what is accepted. Overrides
are dotted paths (``train.lr=1e-4``) or, for a leaf name that only one section has, the bare
name (``--max_steps 10``).
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InputError, UnknownNameError
from ..utils.config_files import read_config_file, set_path

# guidance w everywhere below is the CFG coefficient of x0_c + w (x0_c - x0_u), the value the
# w-embedding takes; the pipelines' guidance_scale is w + 1.
LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip


class Section(BaseModel):
    """A config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSource(Section):
    """A dataset that a plugin registered (``register_datasets``), as eval configs name one."""

    name: str = Field(description="a registered dataset (ccm_sdk.registry.datasets), e.g. 'world'")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the dataset's factory")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from ..registry import datasets

        if name not in datasets:
            # a ValueError, so that the config error names the key data.dataset.name
            raise ValueError(str(UnknownNameError("dataset", name, datasets.names())))
        return name

    def build(self):
        """The torch Dataset: the registered factory called with ``options``."""
        from ..registry import get_dataset

        return get_dataset(self.name, **self.options)


class DataConfig(Section):
    path: str | None = Field(
        default=None,
        description="image folder (image.png + image.txt, or metadata.jsonl), a .tar shard, or a folder of .tar shards; "
        "None when data.dataset names a registered dataset or a torch Dataset is passed in Python",
    )
    dataset: DatasetSource | None = Field(
        default=None, description="a registered dataset instead of data.path: {name, options} (a dataset passed in Python wins)"
    )
    resolution: int | None = Field(
        default=None, ge=8, le=4096,
        description="resize the shorter side to this and center-crop a square (8 to 4096); None: all images must share one size",
    )
    control_key: str = Field(default="control", description="precomputed control maps: <path>/<key>/<name>.png or <name>.<key>.png in tars")
    default_caption: str | None = Field(default=None, description="caption for images without one; None: a missing caption is an error")
    caption_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="probability of training on the empty caption")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes")

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is not None and self.dataset is not None:
            raise ValueError("set data.path (files) or data.dataset (a registered dataset), not both")
        return self


class OptimConfig(Section):
    max_steps: int = Field(default=1000, ge=1, description="optimizer steps")
    batch_size: int = Field(default=4, ge=1, description="samples per process per micro-step")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-5, gt=0.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(default=1e-8, gt=0.0)
    weight_decay: float = Field(default=1e-2, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, description="clip the gradient norm; None: no clipping")
    seed: int = Field(default=0, ge=0, lt=2**32, description="seed of the initial weights, data order and noise (0 to 2**32-1)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(default="no", description="accelerate's mixed precision (autocast)")
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when available")
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads per process (None: torch's default)")


class CheckpointConfig(Section):
    every: int = Field(default=500, ge=1, description="save a checkpoint every this many steps (and at the end)")
    keep_last: int = Field(default=3, ge=1, description="checkpoints kept; older ones are deleted")
    resume: bool | str = Field(default=False, description="true or 'latest': newest checkpoint in output_dir; or a checkpoint folder")


class LogConfig(Section):
    progress: bool = Field(default=True, description="tqdm progress bar with loss, steps/s and ETA")
    plot: bool = Field(default=True, description="write loss.png at the end (loss.csv is always written)")


class ValidationConfig(Section):
    """Sample images from the current weights during training (``samples/step-<8-digit step>.png`` in output_dir)."""

    interval: int | None = Field(default=None, ge=1, description="render a grid every this many steps and at the end; None: never")
    num_images: int = Field(default=4, ge=1, le=64, description="the first this many items of the training data")
    prompts: list[str] | None = Field(default=None, max_length=64, description="captions to sample instead of the items' own")
    sample_steps: int | None = Field(default=None, ge=1, le=1000, description="sampling steps; None: 4 for consistency models, 25 for DDIM")
    guidance_scale: float | None = Field(default=None, ge=1.0, description="None: the trainer's own (its w + 1), 7.5 for DDIM")
    sample_seed: int = Field(default=0, ge=0, lt=2**32, description="seed of the sampled images (names differ from checkpoint.every and train.seed so bare keys stay unique)")


class HubConfig(Section):
    push: bool = Field(default=False, description="upload the outputs with huggingface_hub.upload_folder at the end")
    repo_id: str | None = None
    private: bool = True

    @model_validator(mode="after")
    def _repo_when_pushing(self):
        if self.push and not self.repo_id:
            raise ValueError("hub.push needs hub.repo_id")
        return self


#: Named consistency-training recipes: the values a recipe gives the keys a config leaves out.
#: 'ccm' is the method as the CCM paper states it (L1, adjacent pairs of the N = 50 grid, stopgrad
#: target); 'relative-gap' pairs each t with the grid point at or below t / 2 and uses pseudo-Huber,
#: which learns control where 'ccm' does not (docs/training.md, "Choosing a consistency-training recipe").
CONSISTENCY_RECIPES: dict[str, dict[str, Any]] = {
    "ccm": {"distance": "l1", "gap_ratio": None, "huber_c": 0.001},
    "relative-gap": {"distance": "huber", "gap_ratio": 0.5, "huber_c": 0.03},
}
DEFAULT_CONSISTENCY_RECIPE = "relative-gap"


class ConsistencyConfig(Section):
    """The consistency-training loss (method doc, section 3.2), from a named recipe plus any key set explicitly."""

    recipe: Literal["ccm", "relative-gap"] = Field(
        default=DEFAULT_CONSISTENCY_RECIPE,
        description="named recipe that fills distance, huber_c and gap_ratio where the config leaves them out: "
        "'ccm' (the paper's L1 on adjacent grid pairs) or 'relative-gap' (pairs (t/2, t), pseudo-Huber)",
    )

    num_points: int = Field(default=50, ge=2, description="N: points of the skipping-step grid; n ~ U{0..N-2} by default")
    boundary: bool = Field(
        default=False,
        description="prepend t=0 to the grid (n ~ U{0..N-1}): c_skip(0) = 1, so the lowest pair's target is the "
        "noised data itself, the boundary condition f(x, 0) = x; LCM's grid k-1, 2k-1, ... has no such point",
    )
    pair_sampling: Literal["uniform", "lognormal"] = Field(
        default="uniform",
        description="how n is drawn: 'uniform' (the method), or 'lognormal': improved CT's discretised lognormal over "
        "sigma = sqrt((1 - abar) / abar), which draws the low-noise pairs more often",
    )
    lognormal_mean: float = Field(default=-1.1, description="P_mean of 'lognormal' pair sampling (improved CT's value)")
    lognormal_std: float = Field(default=2.0, gt=0.0, description="P_std of 'lognormal' pair sampling (improved CT's value)")
    data_target_above: int = Field(
        default=1000, ge=0, le=1000,
        description="pairs whose upper timestep t_{n+1} is at least this take the data x_0 itself as their target (the "
        "pair's low end moved to t = 0, CT's coarsest discretisation); 1000: never (the method), 0: every pair",
    )
    gap_ratio: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="None: each pair's low end is the adjacent grid point (the method); r: the highest grid point at "
        "or below (1 - r) t_{n+1} (a gap relative to t, as in easy consistency tuning), the data where there is none "
        "(left out: the recipe's)",
    )
    weighting: Literal["uniform", "output_scale", "ict"] = Field(
        default="uniform",
        description="per-pair weight: 'uniform' (the method); 'output_scale': 1 / (df / d model output) at t_{n+1}, "
        "so a branch on a frozen model is trained as strongly at low noise as at high; 'ict': improved CT's "
        "1 / (sigma_{n+1} - sigma_n). Weights are normalised to mean 1 over the grid's pairs",
    )
    distance: Literal["l1", "l2", "huber", "random"] = Field(default="l1", description="d; 'random' picks one per step (left out: the recipe's)")
    huber_c: float = Field(default=0.001, gt=0.0, description="c of the pseudo-Huber distance sqrt((a-b)^2+c^2)-c (left out: the recipe's)")
    w: float = Field(default=7.0, ge=0.0, description="guidance w fed as the w-embedding (guidance_scale - 1)")
    w_range: tuple[float, float] | None = Field(default=None, description="sample w ~ U[w_min, w_max] per sample instead")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        recipe = data.get("recipe", DEFAULT_CONSISTENCY_RECIPE)
        if recipe not in CONSISTENCY_RECIPES:
            return data  # the Literal field names the accepted recipes
        return {**CONSISTENCY_RECIPES[recipe], **data}

    @model_validator(mode="after")
    def _ordered_range(self):
        if self.w_range is not None and not 0 <= self.w_range[0] <= self.w_range[1]:
            raise ValueError(f"expected w_range [w_min, w_max] with 0 <= w_min <= w_max, got {list(self.w_range)}")
        return self


class LoraSection(Section):
    rank: int = Field(default=64, ge=1)
    alpha: float | None = Field(default=None, gt=0.0, description="LoRA alpha; None: the rank")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))


class TrainConfig(Section):
    """Fields every trainer shares."""

    trainer: str = Field(description="the registered trainer that reads this config (ccm train --help lists them)")
    output_dir: str = Field(description="checkpoints/, the trained weights, loss.csv/png and training_summary.json go here")
    model: str = Field(description="base model folder or hub id in diffusers layout")
    data: DataConfig = Field(default_factory=DataConfig)
    train: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    hub: HubConfig = Field(default_factory=HubConfig)


def check_levels(section: Section, down: tuple[str, ...] | None, up: tuple[str, ...] | None) -> None:
    """Block lists that agree with block_out_channels, and channels the group norm can split."""
    levels = len(section.block_out_channels)
    for name, types_ in (("down_block_types", down), ("up_block_types", up)):
        if types_ is not None and len(types_) != levels:
            raise ValueError(f"expected {levels} {name} (one per block_out_channels entry), got {len(types_)}")
    odd = [c for c in section.block_out_channels if c % section.norm_num_groups]
    if odd:
        raise ValueError(f"block_out_channels {list(odd)} are not divisible by norm_num_groups {section.norm_num_groups}")


# --- loading ---------------------------------------------------------------------------


def config_class(trainer: str) -> type[TrainConfig]:
    """The config class of the trainer registered as ``trainer``; UnknownNameError lists the registered ones."""
    from ..registry import trainers

    return trainers.get(trainer).config_class


def load_config(
    trainer: str | None = None, path: str | Path | None = None, overrides: typing.Iterable[tuple[str, Any]] = ()
) -> TrainConfig:
    """Validate a config file (optional) plus ``(key, value)`` overrides for ``trainer``.

    ``trainer`` may come from the file's ``trainer:`` key; when both are given they must agree.
    """
    raw = read_config_file(path) if path is not None else {}
    named = raw.get("trainer")
    if trainer is None:
        if named is None:
            raise InputError("no trainer named: pass one, or put 'trainer: <name>' in the config file")
        trainer = str(named)
    elif named is not None and named != trainer:
        raise InputError(f"the config file {str(path)!r} is for trainer {named!r}, not {trainer!r}")
    cls = config_class(trainer)
    raw["trainer"] = trainer
    for key, value in overrides:
        set_path(raw, resolve_key(cls, key), value)
    return validate_config(cls, raw)


def validate_config(cls: type[TrainConfig], raw: dict[str, Any]) -> TrainConfig:
    """``cls(**raw)``, with pydantic's errors rewritten to name each key and what is accepted."""
    try:
        return cls(**raw)
    except ValidationError as exc:
        raise InputError(f"invalid {cls.__name__} config: " + "; ".join(_describe(cls, e) for e in exc.errors())) from None


def _describe(cls: type[BaseModel], error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<root>"
    if error["type"] == "extra_forbidden":
        owner = _model_at(cls, loc[:-1])
        accepted = list(owner.model_fields) if owner is not None else []
        where = ".".join(loc[:-1]) or "the top level"
        return f"unknown key {key!r}{_suggest(loc[-1], accepted)}; accepted in {where}: {', '.join(accepted)}"
    if error["type"] == "missing":
        return f"{key!r} is required"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _suggest(name: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(name, accepted, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- key paths -------------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside ``annotation`` (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _model_at(cls: type[BaseModel], parts: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = cls
    for part in parts:
        if model is None:
            return None
        if part.isdigit() and model is not cls:
            continue  # a list index: stay on the element model
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field is not None else None
    return model


def leaf_keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable dotted key of ``cls`` (sections expanded; lists and dicts as one key)."""
    keys = []
    for name, field in cls.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) is not list:
            keys.extend(leaf_keys(sub, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def resolve_key(cls: type[TrainConfig], key: str) -> list[str]:
    """A dotted override key -> its path; a bare leaf name is looked up in the sections."""
    parts = key.replace("-", "_").split(".")
    if len(parts) == 1 and parts[0] not in cls.model_fields:
        matches = [k for k in leaf_keys(cls) if k.rsplit(".", 1)[-1] == parts[0]]
        if len(matches) == 1:
            return matches[0].split(".")
        if len(matches) > 1:
            raise InputError(f"key {key!r} is ambiguous for {cls.__name__}: use one of {', '.join(matches)}")
    model: type[BaseModel] | None = cls
    for i, part in enumerate(parts):
        if model is None:
            break  # inside a dict or list value: pydantic validates the rest
        if part.isdigit() and i > 0:
            continue
        if part not in model.model_fields:
            where = ".".join(parts[:i]) or "the top level"
            accepted = list(model.model_fields)
            raise InputError(
                f"unknown key {key!r}{_suggest(part, accepted)} for {cls.__name__}; accepted in {where}: {', '.join(accepted)}"
            )
        model = _model_of(model.model_fields[part].annotation)
    return parts


def dump_config(config: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def describe_config(cls: type[TrainConfig]) -> str:
    """One line per key: name, default, description (``ccm train <trainer> --help``)."""
    lines = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = _model_of(field.annotation)
            if sub is not None and typing.get_origin(field.annotation) is not list:
                walk(sub, f"{prefix}{name}.")
                continue
            default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"  {prefix}{name} = {default}" + (f"  # {field.description}" if field.description else ""))

    walk(cls, "")
    return "\n".join(lines)
