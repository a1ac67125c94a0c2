"""Shared tests every Condition should pass, as a pytest base class (diffusers' SchedulerCommonTest pattern).

A condition's test module subclasses it and names the condition::

    from ccm_sdk.testing.conditions import ConditionTestBase

    class TestMyCondition(ConditionTestBase):
        condition_name = "mine"                 # looked up with ccm_sdk.get_condition
        condition_options = {"strength": 2}

Model-backed conditions override ``create_condition(workdir, **options)`` to save a tiny model in
``workdir`` (one temporary folder per test class) and load it from there. Conditions that need
extra arguments (a mask) override ``call_kwargs``; other photos come from ``sample_images``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from ..errors import DTypeError, ImageSizeError, InputError, NonFiniteError, ShapeError, ValueRangeError
from ..images import to_rgb, to_tensor
from ..interfaces import Condition, ConditionOptions
from .. import registry
from ..registry import get_condition


def sample_photos(size: tuple[int, int] = (64, 96), count: int = 2) -> torch.Tensor:
    """``count`` real photos (scikit-image's astronaut, chelsea, coffee) as float [B, 3, H, W] on the uint8 grid.

    Without scikit-image, smooth synthetic scenes with edges stand in.
    """
    height, width = size
    try:
        from skimage import data

        photos = [data.astronaut(), data.chelsea(), data.coffee()]
    except ImportError:
        yy, xx = np.mgrid[0:256, 0:256] / 255.0
        photos = []
        for k in range(3):
            scene = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * (0.3 + 0.2 * k)
            scene[64 + 16 * k : 160, 48:200] = (0.9, 0.4 + 0.1 * k, 0.2)
            photos.append((scene.clip(0, 1) * 255).astype(np.uint8))
    arrays = [
        np.asarray(Image.fromarray(photos[i % len(photos)]).resize((width, height), Image.BICUBIC))
        for i in range(count)
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


class ConditionTestBase:
    """Checks the Condition contract: shapes, range, batching, determinism, input types, options, bad input."""

    condition_name: ClassVar[str | None] = None
    condition_options: ClassVar[dict[str, Any]] = {}
    image_size: ClassVar[tuple[int, int]] = (64, 96)  # not square, to catch swapped height and width
    atol: ClassVar[float] = 1e-5  # between results that must agree (batching, input types, repeats)
    extract_matches_preprocess: ClassVar[bool] = True  # h(x) == preprocess(x) on the same image
    roundtrip_atol: ClassVar[float | None] = None  # set where extract(preprocess(x)) ~ preprocess(x): mean |diff|

    # --- hooks a subclass may override ----------------------------------------------------

    def create_condition(self, workdir: Path, **options: Any) -> Condition:
        """The condition under test with ``options`` on top of ``condition_options``."""
        if self.condition_name is None:
            raise TypeError(f"{type(self).__name__}: set condition_name or override create_condition")
        return get_condition(self.condition_name, **{**self.condition_options, **options})

    def sample_images(self) -> torch.Tensor:
        """Two RGB images [2, 3, H, W] in [0, 1], exactly representable as uint8."""
        return sample_photos(self.image_size, 2)

    def call_kwargs(self, images: torch.Tensor) -> dict[str, Any]:
        """Extra keyword arguments for preprocess/extract on ``images`` (e.g. ``mask``)."""
        return {}

    def assert_maps_close(self, actual: torch.Tensor, expected: torch.Tensor) -> None:
        torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=self.atol, rtol=0)

    # --- fixtures ---------------------------------------------------------------------------

    # Class-scoped fixtures are classmethods (pytest's rule); the hooks above run on a fresh instance.
    @pytest.fixture(scope="class")
    @classmethod
    def workdir(cls, tmp_path_factory) -> Path:
        return tmp_path_factory.mktemp(cls.__name__)

    @pytest.fixture(scope="class")
    @classmethod
    def condition(cls, workdir) -> Condition:
        return cls().create_condition(workdir)

    @pytest.fixture(scope="class")
    @classmethod
    def images(cls) -> torch.Tensor:
        return cls().sample_images()

    def run(self, condition: Condition, image, **kwargs: Any) -> torch.Tensor:
        """``condition(image)`` plus ``call_kwargs`` for it (any input type)."""
        batch = to_rgb(to_tensor(image, channels=(1, 3, 4)))
        return condition(image, **{**self.call_kwargs(batch), **kwargs})

    # --- the contract -----------------------------------------------------------------------

    def test_class_attributes(self, condition):
        cls = type(condition)
        assert isinstance(cls.name, str) and cls.name
        assert isinstance(cls.channels, int) and cls.channels >= 1
        assert issubclass(cls.Options, ConditionOptions)
        assert cls.Options.model_config.get("extra") == "forbid"
        assert cls.description
        if self.condition_name is not None:
            assert cls.name == self.condition_name
            assert registry.conditions.get(self.condition_name) is cls

    def test_output_shape_and_dtype(self, condition, images):
        out = self.run(condition, images)
        assert out.shape == (2, condition.channels, *self.image_size)
        assert out.dtype == torch.float32

    def test_output_range(self, condition, images):
        out = self.run(condition, images)
        assert torch.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0

    def test_batch_matches_single_images(self, condition, images):
        together = self.run(condition, images)
        for i in range(images.shape[0]):
            self.assert_maps_close(together[i : i + 1], self.run(condition, images[i : i + 1]))

    def test_deterministic(self, condition, images):
        self.assert_maps_close(self.run(condition, images), self.run(condition, images))

    def test_pil_numpy_tensor_inputs_agree(self, condition, images):
        expected = self.run(condition, images)
        as_uint8 = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        self.assert_maps_close(self.run(condition, as_uint8), expected)
        self.assert_maps_close(self.run(condition, [Image.fromarray(a) for a in as_uint8]), expected)

    def test_output_types(self, condition, images):
        pil = self.run(condition, images, output_type="pil")
        assert isinstance(pil, list) and len(pil) == 2 and isinstance(pil[0], Image.Image)
        assert pil[0].size == (self.image_size[1], self.image_size[0])
        array = self.run(condition, images, output_type="np")
        assert isinstance(array, np.ndarray) and array.shape == (2, *self.image_size, condition.channels)

    def test_output_size_option(self, workdir, images):
        condition = self.create_condition(workdir, output_size=(40, 56))
        assert self.run(condition, images).shape == (2, condition.channels, 40, 56)

    def test_detect_resolution_keeps_input_size(self, workdir, images):
        condition = self.create_condition(workdir, detect_resolution=32)
        assert self.run(condition, images).shape == (2, condition.channels, *self.image_size)

    def test_extract(self, condition, images):
        extracted = condition.extract_from(images, **self.call_kwargs(images))
        assert extracted.shape == (2, condition.channels, *self.image_size)
        assert extracted.min() >= 0.0 and extracted.max() <= 1.0
        if self.extract_matches_preprocess:
            self.assert_maps_close(extracted, self.run(condition, images))

    def test_extract_of_preprocess_round_trip(self, condition, images):
        if self.roundtrip_atol is None:
            pytest.skip("extract(preprocess(x)) is not expected to reproduce preprocess(x) for this condition")
        control = self.run(condition, images)
        again = condition.extract_from(control[:, :3], **self.call_kwargs(images))
        assert (again - control).abs().mean().item() <= self.roundtrip_atol

    def test_unknown_option_rejected(self, workdir):
        with pytest.raises(InputError, match="not_an_option"):
            self.create_condition(workdir, not_an_option=1)

    def test_badly_typed_option_rejected(self, workdir):
        with pytest.raises(InputError, match="detect_resolution"):
            self.create_condition(workdir, detect_resolution="large")

    def test_options_round_trip_through_json(self, condition):
        options = condition.options
        assert type(options).model_validate(json.loads(options.model_dump_json())) == options

    def test_grayscale_input_is_replicated(self, condition, images):
        gray = images.mean(dim=1, keepdim=True)
        gray = (gray * 255).round() / 255
        self.assert_maps_close(self.run(condition, gray), self.run(condition, gray.expand(-1, 3, -1, -1)))

    def test_rgba_input_drops_alpha(self, condition, images):
        rgba = torch.cat([images, torch.full_like(images[:, :1], 0.5)], dim=1)
        self.assert_maps_close(self.run(condition, rgba), self.run(condition, images))

    def test_smallest_image(self, condition, images):
        tiny = images[:1, :, :2, :2].contiguous()
        assert self.run(condition, tiny).shape == (1, condition.channels, 2, 2)

    def test_one_pixel_image_rejected(self, condition, images):
        with pytest.raises(ShapeError):
            self.run(condition, images[:1, :, :1, :1].contiguous())

    def test_empty_image_rejected(self, condition):
        with pytest.raises(ImageSizeError):
            condition(torch.zeros(1, 3, 0, 8))

    def test_out_of_range_values_rejected(self, condition, images):
        with pytest.raises(ValueRangeError):
            condition(images * 255.0)

    def test_non_finite_values_rejected(self, condition, images):
        bad = images.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(NonFiniteError):
            condition(bad)

    def test_wrong_dtype_rejected(self, condition, images):
        with pytest.raises(DTypeError):
            condition((images * 255).to(torch.int32))

    def test_wrong_channel_count_rejected(self, condition, images):
        with pytest.raises(ShapeError):
            condition(torch.cat([images, images[:, :2]], dim=1))


def assert_registered_through_entry_point(name: str, distribution: str) -> None:
    """Condition ``name`` comes from a ``ccm_sdk`` entry point of the installed ``distribution``."""
    from importlib.metadata import entry_points

    matches = [ep for ep in entry_points(group="ccm_sdk") if ep.name == name]
    assert len(matches) == 1, f"expected one ccm_sdk entry point named {name!r}, found {len(matches)}"
    ep = matches[0]
    assert ep.dist is not None and ep.dist.metadata["Name"] == distribution
    entry = registry.conditions.entry(name)
    assert entry.plugin == name, f"{name!r} was registered by plugin {entry.plugin!r}"
    assert entry.obj.__module__ == ep.value
