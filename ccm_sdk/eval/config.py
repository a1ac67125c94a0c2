"""Eval configs (pydantic, ``extra="forbid"``), and the paper's Table 2 methods as named presets.

A method is one way to make controlled images: a model folder, one ControlNet per condition,
an optional adapter, a sampler, its step counts and guidance. ``methods`` in a config lists
full ``MethodConfig`` entries or preset names; presets take their models from ``paper``:

| preset | paper row | model | ControlNets | sampler |
|---|---|---|---|---|
| ``dm-controlnet+dm`` | DM's ControlNet + DM | dm | dm_controlnets | ddim, CFG (2 NFE a step) |
| ``dm-controlnet+cm`` | DM's ControlNet + CM | cm | dm_controlnets | consistency |
| ``dm-controlnet+cm+adapter`` | DM's ControlNet + CM + adapter | cm | dm_controlnets + adapter | consistency |
| ``cm-controlnet+cm`` | CM's ControlNet + CM | cm | cm_controlnets | consistency |
| ``cm-controlnet+dm`` | CM's ControlNet + DM (reverse transfer) | dm | cm_controlnets | ddim, CFG |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import FactoryNotAllowedError, InputError, MissingModelError, UnknownNameError
from ..utils.config_files import read_config_file
from ..utils.validation_errors import validation_problems
from .features import FeatureConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(Section):
    """Where real images, captions (and precomputed control maps) come from: a registered
    dataset, a factory, or a folder."""

    name: str | None = Field(default=None, description="a dataset registered by a plugin (ccm_sdk.registry.datasets), e.g. 'world'")
    path: str | None = Field(default=None, description="image folder: a.png + a.txt (+ <key>/a.png control maps)")
    factory: str | None = Field(default=None, description="'module:callable' returning a torch Dataset, e.g. 'ccm_world:WorldDataset'; "
                                "runs code named by the config, so it needs CCM_ALLOW_DATASET_FACTORY=1 in the environment")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the named dataset or the factory")
    resolution: int | None = Field(default=None, ge=8, description="folder datasets: resize and center-crop to this square size")

    @model_validator(mode="after")
    def _one_source(self):
        if sum(v is not None for v in (self.name, self.path, self.factory)) != 1:
            raise ValueError("set exactly one of dataset.name, dataset.path and dataset.factory")
        if self.options and self.path is not None:
            raise ValueError("dataset.options only apply to a dataset.name or dataset.factory")
        return self


class LineF1Config(Section):
    """Also score the line F1 of h(y) against c (for sparse line maps: sketch, canny, hed)."""

    threshold: float = Field(default=0.3, ge=0, lt=1, description="a pixel whose mean over channels exceeds it is a line pixel")
    tolerance: int = Field(default=1, ge=0, le=8, description="lines this many pixels apart (Chebyshev) still match")


class ConditionConfig(Section):
    """A condition to evaluate: the registered condition that makes c (or reads it back as h(y))."""

    name: str = Field(description="a registered condition (ccm conditions lists them)")
    options: dict[str, Any] = Field(default_factory=dict)
    control: Literal["extract", "dataset"] = Field(
        default="extract", description="extract: c = the condition run on the real image; dataset: the dataset's map"
    )
    key: str | None = Field(default=None, description="dataset control key (default: the condition's name)")
    label: str | None = Field(default=None, description="column name in reports and key in a method's controlnets")
    line_f1: LineF1Config | None = Field(default=None, description="also score line F1 (sparse line maps; not for mask)")

    @model_validator(mode="after")
    def _lines_of_a_mask(self):
        if self.line_f1 is not None and self.name == "mask":
            raise ValueError("line_f1 compares line maps; the mask condition's map is an image and a mask")
        return self

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def dataset_key(self) -> str:
        return self.key or self.name


class MethodConfig(Section):
    """One row of the results table."""

    name: str
    model: str = Field(description="model folder (diffusers layout) or hub id")
    controlnets: dict[str, str] = Field(default_factory=dict, description="condition label -> ControlNet folder, hub id or 'provider:argument'")
    uncontrolled: bool = Field(default=False, description="generate from the caption alone: the Fidelity a method gets without control")
    adapter: str | None = None
    lora: str | None = None
    sampler: str = "consistency"
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    steps: list[int] = Field(default_factory=lambda: [4], min_length=1)
    guidance_scale: float | None = Field(
        default=None, description="None: the model's recommended scale (its ccm_defaults.json, else 8.0), as ccm generate"
    )
    controlnet_conditioning_scale: float = 1.0

    @model_validator(mode="after")
    def _nothing_to_control_with(self):
        if self.uncontrolled and (self.controlnets or self.adapter):
            raise ValueError(f"method {self.name!r} is uncontrolled: it takes no controlnets and no adapter")
        return self


class PaperModels(Section):
    """The models behind the preset methods."""

    dm: str | None = Field(default=None, description="the diffusion model (the baseline)")
    cm: str | None = Field(default=None, description="the consistency model (LCM) distilled from it")
    dm_controlnets: dict[str, str] = Field(default_factory=dict, description="condition -> ControlNet trained for the DM")
    cm_controlnets: dict[str, str] = Field(default_factory=dict, description="condition -> ControlNet trained for the CM (CT)")
    adapter: str | None = Field(default=None, description="the unified adapter, trained for the DM ControlNets on the CM")
    dm_sampler: str = "ddim"
    dm_steps: list[int] = Field(default_factory=lambda: [50], min_length=1)
    dm_guidance_scale: float = 7.5
    cm_steps: list[int] = Field(default_factory=lambda: [4, 1], min_length=1)
    cm_guidance_scale: float | None = Field(
        default=None, description="None: the consistency model's recommended scale (its ccm_defaults.json, else 8.0)"
    )


# preset -> (paper row, model field, ControlNets field (None: no control), uses the adapter, diffusion sampling)
PRESETS: dict[str, tuple[str, str, str | None, bool, bool]] = {
    "dm-controlnet+dm": ("DM's ControlNet + DM", "dm", "dm_controlnets", False, True),
    "dm-controlnet+cm": ("DM's ControlNet + CM", "cm", "dm_controlnets", False, False),
    "dm-controlnet+cm+adapter": ("DM's ControlNet + CM + adapter", "cm", "dm_controlnets", True, False),
    "cm-controlnet+cm": ("CM's ControlNet + CM", "cm", "cm_controlnets", False, False),
    "cm-controlnet+dm": ("CM's ControlNet + DM", "dm", "cm_controlnets", False, True),
    "cm": ("CM, no control", "cm", None, False, False),  # references: the Fidelity of the caption alone
    "dm": ("DM, no control", "dm", None, False, True),
}
TABLE2_PRESETS = ("dm-controlnet+dm", "dm-controlnet+cm", "dm-controlnet+cm+adapter", "cm-controlnet+cm")


class CorrelationConfig(Section):
    """The residual correlation analysis between two ControlNets (``analysis.py``)."""

    model: str = Field(description="model whose VAE and text encoder make the inputs")
    controlnet_a: str
    controlnet_b: str
    label_a: str = "A"
    label_b: str = "B"
    condition: str = Field(description="label of one of the config's conditions: its control maps are the input")
    timesteps: list[int] = Field(default_factory=lambda: [999, 749, 499, 249], min_length=1)
    num_samples: int = Field(default=8, ge=1)


class EvalConfig(Section):
    output_dir: str = "outputs/eval"
    dataset: DatasetConfig
    num_samples: int = Field(default=32, ge=2, description="real and generated images per condition and method (FID needs 2+)")
    batch_size: int = Field(default=8, ge=1)
    seed: int = Field(default=0, ge=0, lt=2**32, description="seed of the initial noise of every cell (0 to 2**32-1)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    conditions: list[ConditionConfig] = Field(min_length=1)
    methods: list[str | MethodConfig] = Field(min_length=1)
    paper: PaperModels | None = None
    show: int = Field(default=4, ge=1, description="samples per method and condition in samples.png")
    warmup: bool = Field(default=True, description="one untimed generation per method and step count first")
    fid_floor: bool = Field(
        default=True,
        description="also score a second, disjoint set of num_samples real images against the first: the FID that "
        "two samples of the same distribution get at this size (needs 2 x num_samples items in the dataset)",
    )
    correlation: list[CorrelationConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_labels(self):
        titles = [c.title for c in self.conditions]
        if len(set(titles)) != len(titles):
            raise ValueError(f"condition labels must be unique, got {titles}; set 'label' to tell them apart")
        return self


def preset_method(name: str, paper: PaperModels | None) -> MethodConfig:
    """The ``MethodConfig`` of preset ``name`` with the models of ``paper``."""
    if name not in PRESETS:
        raise UnknownNameError("eval method preset", name, PRESETS)
    title, model_field, controlnets_field, adapter, diffusion = PRESETS[name]
    if paper is None:
        raise InputError(f"method preset {name!r} takes its models from the config's 'paper' section, which is missing")
    model = getattr(paper, model_field)
    if model is None:
        raise InputError(f"method preset {name!r} needs paper.{model_field} (a model folder)")
    if adapter and paper.adapter is None:
        raise InputError(f"method preset {name!r} needs paper.adapter (a unified-adapter folder)")
    return MethodConfig(
        name=title,
        model=model,
        controlnets={} if controlnets_field is None else getattr(paper, controlnets_field),
        uncontrolled=controlnets_field is None,
        adapter=paper.adapter if adapter else None,
        sampler=paper.dm_sampler if diffusion else "consistency",
        steps=paper.dm_steps if diffusion else paper.cm_steps,
        guidance_scale=paper.dm_guidance_scale if diffusion else paper.cm_guidance_scale,
    )


def expand_methods(config: EvalConfig, only: list[str] | None = None) -> list[MethodConfig]:
    """Presets resolved, names checked unique, and every method given a ControlNet per condition.

    ``only`` keeps the methods with these preset or method names (unknown ones raise).
    """
    entries = [(m, preset_method(m, config.paper)) if isinstance(m, str) else (m.name, m) for m in config.methods]
    if only is not None:
        known = {key for key, _ in entries} | {method.name for _, method in entries}
        for name in only:
            if name not in known:
                raise UnknownNameError("eval method", name, known)
        entries = [(key, method) for key, method in entries if key in only or method.name in only]
    methods = [method for _, method in entries]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError(f"method names must be unique, got {names}")
    for method in (m for m in methods if not m.uncontrolled):
        missing = [c.title for c in config.conditions if c.title not in method.controlnets]
        if missing:
            raise InputError(f"method {method.name!r} has no ControlNet for condition(s) {missing}; add them to its controlnets")
    return methods


ALLOW_FACTORY_VARIABLE = "CCM_ALLOW_DATASET_FACTORY"


def check_factory_allowed(factory: str) -> None:
    """Raise FactoryNotAllowedError unless the environment opts in to ``dataset.factory``.

    A factory is any ``module:callable`` (``subprocess:check_call`` runs a shell command), so
    a config file alone must not be able to run it: whoever runs the evaluation opts in, in the
    environment, which a config cannot set. Registered datasets (``dataset: {name: ...}``) need no opt-in.
    """
    if os.environ.get(ALLOW_FACTORY_VARIABLE, "").strip() == "1":
        return
    raise FactoryNotAllowedError(
        f"dataset.factory {factory!r} would import and call code named by the config; expected a registered dataset "
        f"(dataset: {{name: ...}}, see ccm_sdk.registry.datasets) or the opt-in {ALLOW_FACTORY_VARIABLE}=1 in the "
        f"environment, got {ALLOW_FACTORY_VARIABLE}={os.environ.get(ALLOW_FACTORY_VARIABLE, '')!r}"
    )


def check_names(config: EvalConfig, methods: list[MethodConfig]) -> None:
    """Raise UnknownNameError for conditions or samplers that nothing registered (and
    FactoryNotAllowedError for a dataset factory without the opt-in)."""
    from ..registry import conditions, samplers

    if config.dataset.factory is not None:
        check_factory_allowed(config.dataset.factory)
    for condition in config.conditions:
        conditions.get(condition.name)
    for method in methods:
        samplers.get(method.sampler)
    titles = {c.title for c in config.conditions}
    for analysis in config.correlation:
        if analysis.condition not in titles:
            raise UnknownNameError("eval condition", analysis.condition, titles)


def load_eval_config(source: str | os.PathLike | dict[str, Any], overrides: dict[str, Any] | None = None) -> EvalConfig:
    """An ``EvalConfig`` from a YAML/JSON file or a dict, with top-level ``overrides``; errors are InputErrors."""
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.exists():
            raise MissingModelError(f"eval config {str(path)!r} does not exist")
        raw = read_config_file(path)
    raw.update(overrides or {})
    try:
        return EvalConfig(**raw)
    except ValidationError as exc:
        raise InputError(f"invalid eval config: {validation_problems(exc)}") from None
