"""The README example's judge: the sketch's regions and the colour each takes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ccm_sdk.errors import InputError
from ccm_world.vocabulary import PALETTE

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_example.py"


def _load():
    spec = importlib.util.spec_from_file_location("readme_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _painted(regions, colours):
    image = np.zeros((*regions.shape, 3), dtype=np.uint8)
    for region, name in enumerate(colours):
        image[regions.numpy() == region] = PALETTE[name]
    return Image.fromarray(image)


def test_the_example_sketch_splits_into_background_triangle_above_and_diamond_below():
    module = _load()
    regions = module.sketch_regions(Image.open(module.SKETCH))
    rows = [np.nonzero(regions.numpy() == k)[0] for k in range(4)]
    assert all(len(r) > 50 for r in rows)  # background, triangle, diamond, outlines
    assert rows[1].mean() < rows[2].mean()  # the triangle is above the diamond
    assert (regions[0] == 0).all() and (regions[-1] == 0).all()


def test_judge_names_each_regions_colour_and_spots_a_swap():
    module = _load()
    targets = module.example_targets(Image.open(module.SKETCH))
    assert module.judge(_painted(targets.regions, ["green", "yellow", "blue"]), targets) == ["green", "yellow", "blue"]
    assert module.judge(_painted(targets.regions, ["green", "blue", "yellow"]), targets) == ["green", "blue", "yellow"]
    with pytest.raises(InputError, match="size"):
        module.judge(Image.new("RGB", (32, 32)), targets)


def test_a_sketch_without_two_closed_shapes_is_refused():
    module = _load()
    sketch = Image.new("RGB", (64, 64))
    ImageDraw.Draw(sketch).rectangle([10, 10, 30, 30], outline="white")  # one closed shape
    with pytest.raises(InputError, match="enclose two shapes"):
        module.sketch_regions(sketch)
