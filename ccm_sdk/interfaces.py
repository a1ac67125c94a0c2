"""The extension interfaces: Condition, Adapter, Sampler, and the ControlNet provider protocol."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import images as image_utils
from .errors import ConditionOutputError, ImageSizeError, InputError, ShapeError
from .utils.image_files import MAX_SIDE_LIMIT
from .utils.validation_errors import validation_problems

if TYPE_CHECKING:
    from .schedule import NoiseSchedule


class Options(BaseModel):
    """Base of every options model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def build_options(options_cls: type[Options], owner: str, values: dict[str, Any]) -> Options:
    """Validate ``values`` into ``options_cls``, turning pydantic's error into an InputError."""
    try:
        return options_cls(**values)
    except ValidationError as exc:
        problems = validation_problems(exc, with_input=True)
        fields = ", ".join(options_cls.model_fields) or "none"
        raise InputError(f"invalid options for {owner}: {problems}. Accepted options: {fields}") from None


# --- conditions ------------------------------------------------------------------------


class ConditionOptions(Options):
    """Options every condition accepts."""

    detect_resolution: int | None = Field(
        default=None, ge=8, le=MAX_SIDE_LIMIT,
        description="resize the input so its shorter side has this many pixels before detection",
    )
    output_size: tuple[Annotated[int, Field(ge=1, le=MAX_SIDE_LIMIT)], Annotated[int, Field(ge=1, le=MAX_SIDE_LIMIT)]] | None = Field(
        default=None, description="(height, width) of the control map; default: the input's size"
    )


class Condition(ABC):
    """Turns images into control maps for a ControlNet, and extracts them back as h(y).

    Subclasses set ``name``, ``channels`` and optionally ``Options``, and implement
    ``preprocess`` on a float32 RGB batch [B, 3, H, W] in [0, 1]. A condition whose network is
    downloaded on first use names the hub repo of its default weights in ``weights``.
    """

    name: ClassVar[str]
    channels: ClassVar[int] = 3
    Options: ClassVar[type[ConditionOptions]] = ConditionOptions
    description: ClassVar[str] = ""
    origin: str | None = None  # the plugin it came from ("plugin 'x' of distribution 'y' 1.0"), set by get_condition
    weights: ClassVar[str | None] = None  # hub repo of the default weights, downloaded on first use; None: nothing to download

    def __init__(self, **options: Any):
        self.options = build_options(self.Options, f"condition {self.name!r}", options)

    @abstractmethod
    def preprocess(self, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """[B, 3, H, W] RGB in [0, 1] -> control map [B, channels, h, w] in [0, 1]."""

    def extract(self, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """h(y): the control map read back from generated images (default: the preprocessor)."""
        return self.preprocess(images, **kwargs)

    def prepare(self, image: image_utils.ImageLike | Sequence[image_utils.ImageLike]) -> torch.Tensor:
        """Convert any supported input to the RGB batch ``preprocess`` takes, at detect resolution."""
        tensor = image_utils.to_rgb(image_utils.to_tensor(image, channels=(1, 3, 4)))
        if tensor.shape[-1] < 2 or tensor.shape[-2] < 2:
            raise ShapeError(f"condition {self.name!r} needs images of at least 2x2 pixels, got {tuple(tensor.shape[-2:])}")
        side = self.options.detect_resolution
        if side is not None:
            h, w = tensor.shape[-2:]
            scale = side / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            if size[0] * size[1] > MAX_SIDE_LIMIT**2:  # a long, thin image scaled up by its short side
                raise ImageSizeError(f"condition {self.name!r}: detect_resolution={side} scales the {h}x{w} input to "
                                     f"{size[0]}x{size[1]} pixels; at most {MAX_SIDE_LIMIT}x{MAX_SIDE_LIMIT} pixels are detected on")
            tensor = image_utils.resize(tensor, size)
        return tensor

    def _finish(self, control: Any, batch: int, input_size: tuple[int, int], output_type: str):
        control = check_control_map(control, condition=self, batch=batch)
        size = self.options.output_size or input_size
        control = image_utils.resize(control, tuple(size))
        return image_utils.from_tensor(control.clamp(0, 1), output_type)

    def _run(self, method, image, output_type: str, kwargs: dict[str, Any]):
        batch = self.prepare(image)
        input_size = tuple(image_utils.to_tensor(image).shape[-2:]) if self.options.detect_resolution else tuple(batch.shape[-2:])
        with torch.no_grad():
            control = method(batch, **kwargs)
        return self._finish(control, batch.shape[0], input_size, output_type)

    def __call__(self, image, *, output_type: str = "pt", **kwargs: Any):
        """Preprocess PIL/numpy/tensor input into a control map (tensor [B,C,H,W] by default)."""
        return self._run(self.preprocess, image, output_type, kwargs)

    def extract_from(self, image, *, output_type: str = "pt", **kwargs: Any):
        """Run ``extract`` (h(y)) on PIL/numpy/tensor input, as ``__call__`` runs ``preprocess``."""
        return self._run(self.extract, image, output_type, kwargs)

    def to(self, device: torch.device | str) -> Condition:
        """Move any networks the condition holds; light conditions have none."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


CONTROL_RANGE_SLACK = 1e-4  # float rounding just outside [0, 1] is clamped, not refused


def condition_origin(condition: Condition) -> str:
    """Where a condition comes from, for error messages: the plugin :func:`ccm_sdk.get_condition` took it
    from, or its class when it was made directly."""
    if getattr(condition, "origin", None):
        return condition.origin
    cls = type(condition)
    return f"class {cls.__module__}.{cls.__qualname__}, not looked up by name"


def check_control_map(control: Any, *, condition: Condition, batch: int | None = None) -> torch.Tensor:
    """``control`` if it is what ``condition.preprocess``/``extract`` promise: a floating-point
    ``torch.Tensor`` ``[B, condition.channels, H, W]`` (``B == batch`` when given) of finite values in
    [0, 1]. Anything else raises :class:`ConditionOutputError` naming the condition, its plugin, what
    was expected and what came.
    """

    def fail(expected: str, got: str) -> ConditionOutputError:
        return ConditionOutputError(f"condition {getattr(condition, 'name', '?')!r} ({condition_origin(condition)}) "
                                    f"returned a bad control map: expected {expected}, got {got}")

    channels = condition.channels
    if not isinstance(control, torch.Tensor):
        raise fail("a torch.Tensor", f"{type(control).__module__}.{type(control).__qualname__}")
    if not control.is_floating_point():
        raise fail("a floating-point tensor", f"dtype {control.dtype}")
    if control.ndim != 4:
        raise fail(f"a 4-d tensor [B, {channels}, H, W]", f"{control.ndim}-d shape {tuple(control.shape)}")
    if control.shape[1] != channels:
        raise fail(f"{channels} channel(s) [B, {channels}, H, W]", f"shape {tuple(control.shape)}")
    if batch is not None and control.shape[0] != batch:
        raise fail(f"one map per input image ({batch})", f"{control.shape[0]} in shape {tuple(control.shape)}")
    if control.shape[2] < 1 or control.shape[3] < 1:
        raise fail("a map of at least 1x1 pixels", f"shape {tuple(control.shape)}")
    finite = torch.isfinite(control)
    if not bool(finite.all()):
        nan = int(torch.isnan(control).sum())
        raise fail("finite values in [0, 1]", f"{nan} NaN and {int((~finite).sum()) - nan} infinite value(s) "
                   f"of {control.numel()}")
    low, high = (float(control.min()), float(control.max())) if control.numel() else (0.0, 0.0)
    if low < -CONTROL_RANGE_SLACK or high > 1 + CONTROL_RANGE_SLACK:
        raise fail("values in [0, 1]", f"values in [{low:.4g}, {high:.4g}]")
    return control


# --- adapters --------------------------------------------------------------------------


class Adapter(torch.nn.Module, ABC):
    """Transforms ControlNet residuals before they enter the UNet (CCM's unified adapter seam)."""

    name: ClassVar[str]

    @abstractmethod
    def forward(
        self, down_residuals: Sequence[torch.Tensor], mid_residual: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return the adapted (down residuals, mid residual)."""

    def check_compatible(self, controlnet: torch.nn.Module) -> None:
        """Raise IncompatibleModelsError if this adapter cannot take ``controlnet``'s outputs."""


# --- samplers --------------------------------------------------------------------------

Model = Callable[..., torch.Tensor]
StepCallback = Callable[[dict[str, Any]], Any]


class Sampler(ABC):
    """A sampling method: picks timesteps and runs a pure sampler function over them."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    min_steps: ClassVar[int] = 1
    max_steps: ClassVar[int] = 1000

    def __init__(self, **options: Any):
        self.options = build_options(self.Options, f"sampler {self.name!r}", options)

    @abstractmethod
    def timesteps(self, schedule: NoiseSchedule, num_steps: int, strength: float = 1.0) -> torch.Tensor:
        """Descending integer timesteps for ``num_steps`` steps (fewer when strength < 1)."""

    @abstractmethod
    def sample(
        self,
        model: Model,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        schedule: NoiseSchedule,
        callback: StepCallback | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Run the model over ``timesteps`` from ``x`` and return the final denoised latents."""


class ControlNetProvider(Protocol):
    """Builds or loads a diffusers ControlNetModel from a source (path, repo id, or UNet)."""

    def __call__(self, source: Any, **kwargs: Any) -> torch.nn.Module: ...
