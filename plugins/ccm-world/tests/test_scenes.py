"""Scenes: determinism, variety, captions that describe what is drawn, and a closed vocabulary."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from ccm_world import COLORS, SHAPES, SIZES, WORLD_VOCABULARY, Person, Shape, WorldDataset
from ccm_world.generate import SceneConfig
from ccm_world.scene import label_map, object_mask


@pytest.fixture(scope="module")
def scenes():
    data = WorldDataset(length=400, seed=3)
    return [data.scene(i) for i in range(400)]


def test_same_seed_and_index_give_the_same_sample():
    a, b = WorldDataset(seed=7, length=10), WorldDataset(seed=7, length=10)
    first, second = a[4], b[4]
    assert first["caption"] == second["caption"] and first["scene"] == second["scene"]
    torch.testing.assert_close(first["image"], second["image"], rtol=0, atol=0)
    for name in first["controls"]:
        torch.testing.assert_close(first["controls"][name], second["controls"][name], rtol=0, atol=0)
    # choosing fewer maps never changes the scene or the image
    only_depth = WorldDataset(seed=7, length=10, conditions=("depth",))[4]
    torch.testing.assert_close(only_depth["image"], first["image"], rtol=0, atol=0)
    assert set(only_depth["controls"]) == {"depth"}


def test_different_seeds_and_indices_give_different_scenes():
    captions = {WorldDataset(seed=s, length=5)[0]["caption"] for s in range(6)}
    assert len(captions) >= 5
    data = WorldDataset(seed=0, length=50)
    images = torch.stack([data[i]["image"] for i in range(20)])
    assert len({tuple(im.flatten()[::97].tolist()) for im in images}) == 20


def test_the_world_shows_all_of_its_variety(scenes):
    kinds = Counter(o.kind for s in scenes for o in s.objects)
    assert set(kinds) == {*SHAPES, "person"}
    assert {o.color for s in scenes for o in s.objects} == set(COLORS)
    assert {o.size for s in scenes for o in s.objects} == set(SIZES)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {o.arms for s in scenes for o in s.objects if isinstance(o, Person)} == {"up", "out", "down"}
    assert any(s.background.gradient for s in scenes) and not all(s.background.gradient for s in scenes)
    relations = {r for s in scenes for r in ("left of", "right of", "above", "below", "in front of", "behind") if f" {r} " in s.caption}
    assert len(relations) == 6
    overlapping = sum((object_mask(s, 0) & object_mask(s, 1)).any() for s in scenes if len(s.objects) >= 2)
    assert overlapping > 20


def test_captions_name_every_drawn_object_and_the_background(scenes):
    for scene in scenes:
        caption = scene.caption
        for obj in scene.objects:
            assert f"{obj.size} {obj.color} {obj.kind}" in caption
            if isinstance(obj, Person):
                assert f"person with arms {obj.arms}" in caption
        assert caption.endswith(f"{scene.background.color}{' gradient' if scene.background.gradient else ''} background")
        assert len(caption.split(" , ")) == (2 if len(scene.objects) == 3 else 1)


def test_vocabulary_is_closed(scenes):
    words = {w for s in scenes for w in s.caption.split()}
    assert words <= set(WORLD_VOCABULARY)


def test_objects_stay_mostly_visible_and_colours_distinct(scenes):
    for scene in scenes:
        labels = label_map(scene, 2)
        colors = [scene.background.color] + [o.color for o in scene.objects]
        assert len(set(colors)) == len(colors)
        for k, obj in enumerate(scene.objects):
            assert (labels == k + 1).sum() >= 0.5 * object_mask(scene, k, 2).sum()


def test_front_behind_relations_follow_layer_order(scenes):
    checked = 0
    for scene in scenes:
        for relation, subject_in_front in ((" in front of ", True), (" behind ", False)):
            if len(scene.objects) == 2 and relation in scene.caption:
                subject = scene.caption.split(relation)[0]
                index = next(k for k, o in enumerate(scene.objects) if f"{o.size} {o.color} {o.kind}" in subject)
                assert (index == 1) == subject_in_front  # object 1 is drawn last, so it is in front
                checked += 1
    assert checked > 5


def test_scene_config_is_checked_and_used():
    with pytest.raises(ValueError, match="max_objects"):
        SceneConfig(max_objects=4)
    data = WorldDataset(length=30, seed=1, scene_config=SceneConfig(max_objects=1, person_probability=1.0))
    for i in range(30):
        (only,) = data.scene(i).objects
        assert isinstance(only, Person)
    shapes_only = WorldDataset(length=30, seed=1, scene_config=SceneConfig(person_probability=0.0))
    assert all(isinstance(o, Shape) for i in range(30) for o in shapes_only.scene(i).objects)
    np.testing.assert_equal(len(data), 30)
