"""The text-conditioning experiment's scripts: the probe's noun rows and the colour breakdown."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ccm_world.dataset import WorldDataset
from ccm_world.vocabulary import COLORS

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_noun_rows_give_each_noun_its_own_colour():
    probe = _load("probe_text_binding")
    rows = probe.noun_rows(["a large blue diamond below a medium yellow triangle on a green gradient background"])
    # BOS is position 0: "diamond" is word 3 -> token 4, "triangle" token 9, "background" token 14
    assert rows.tolist() == [[0, 4, COLORS.index("blue"), 0], [0, 9, COLORS.index("yellow"), 0], [0, 14, COLORS.index("green"), 1]]


def test_breakdown_scores_real_images_right_and_a_swap_wrong():
    breakdown = _load("prompt_colour_breakdown").breakdown
    dataset = WorldDataset(size=64, length=100, seed=1, conditions=())
    images = torch.stack([dataset[i]["image"] for i in range(12)])
    groups = breakdown(images, dataset)
    right, scored = groups["objects"]
    assert right == scored > 0
    assert sum(groups[g][1] for g in groups if g.startswith("objects in")) == scored
    flat = torch.zeros_like(images)  # black everywhere: only regions asked to be black are right
    right, scored = breakdown(flat, dataset)["background"]
    asked_black = sum(dataset.scene(i).background.color == "black" for i in range(12))
    assert right == asked_black and scored == 12


def test_leaks_count_a_colour_swap_between_two_objects_and_an_object_in_its_backgrounds_colour():
    module = _load("prompt_colour_breakdown")
    dataset = WorldDataset(size=64, length=200, seed=1, conditions=())
    assert module.leaks(torch.stack([dataset[i]["image"] for i in range(4)]), dataset)[:2] == (0, 0)  # real images: nothing wrong
    # a two-object scene whose three regions ask three different colours
    index = next(i for i in range(200) if len(dataset.scene(i).objects) == 2 and len(set(dataset.colour_targets(i).asked.tolist())) == 3)
    targets = dataset.colour_targets(index)
    background, first, second = targets.asked.tolist()
    before = [dataset[i]["image"] for i in range(index)]

    def painted(colours):
        image = dataset[index]["image"].clone()
        for region, colour in colours:
            image[:, targets.regions == region] = targets.palette[colour][:, None].to(image.dtype)
        return torch.stack(before + [image])

    leaked, wrong, expected, to_background = module.leaks(painted([(1, second), (2, first)]), dataset)  # swapped
    assert (leaked, wrong, to_background) == (2, 2, 0) and 0 < expected < 2
    leaked, wrong, _, to_background = module.leaks(painted([(1, background)]), dataset)  # one object lost in its background
    assert (leaked, wrong, to_background) == (1, 1, 1)
