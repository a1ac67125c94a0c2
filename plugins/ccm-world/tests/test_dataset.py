"""WorldDataset as the trainers and the eval runner consume it, and the folder layout it writes."""

from __future__ import annotations

import json

import pytest
import torch

from ccm_sdk.errors import InputError, UnknownNameError
from ccm_world import ATTRIBUTE_NAMES, CONTROL_CHANNELS, WORLD_CONDITIONS, WorldDataset


def test_item_layout():
    data = WorldDataset(size=(48, 32), length=10, seed=0)
    item = data[3]
    assert set(item) == {"image", "caption", "controls", "labels", "index", "scene"}
    assert item["image"].shape == (3, 48, 32) and item["image"].dtype == torch.float32
    assert set(item["controls"]) == set(WORLD_CONDITIONS)
    for name, control in item["controls"].items():
        assert control.shape == (CONTROL_CHANNELS[name], 48, 32), name
        assert control.min() >= 0 and control.max() <= 1
        torch.testing.assert_close(control, (control * 255).round() / 255, rtol=0, atol=1e-7)  # exact in a PNG
    assert item["labels"].shape == (len(ATTRIBUTE_NAMES),) and item["index"] == 3
    present = {name for name, on in zip(ATTRIBUTE_NAMES, item["labels"]) if on}
    scene = item["scene"]
    assert f"background:{scene['background']['color']}" in present
    assert {f"shape:{o['kind']}" for o in scene["objects"]} | {f"color:{o['color']}" for o in scene["objects"]} <= present
    json.dumps(scene)  # JSON-compatible


def test_training_collate_and_a_dataloader():
    from ccm_sdk.datasets import collate

    data = WorldDataset(size=32, length=8, seed=0, conditions=("canny", "mask"))
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)))
    assert batch["images"].shape == (4, 3, 32, 32) and len(batch["captions"]) == 4
    assert [c.shape for c in batch["controls"]["mask"]] == [(4, 32, 32)] * 4


def test_grounding_items_name_each_words_region():
    """With ``grounding``: ``regions`` is the label map, and every colour word's region shows that colour in
    the image (so the words point at the right pixels); articles and relations name no region."""
    from ccm_sdk.datasets import TorchDataset, collate
    from ccm_world.vocabulary import COLORS, PALETTE, SHAPES, SIZES

    data = WorldDataset(size=64, length=40, seed=5, conditions=(), grounding=True)
    assert "regions" not in WorldDataset(size=64, length=4, seed=5, conditions=())[0]
    palette = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32) / 255
    named = 0
    for i in range(len(data)):
        item = data[i]
        words, regions = item["caption"].split(), item["regions"]
        assert torch.equal(regions, torch.from_numpy(data.render(i, ()).labels.astype("int64")))
        assert len(item["word_regions"]) == len(words)
        scene = data.scene(i)
        for word, region in zip(words, item["word_regions"].tolist()):
            if word in ("a", "an", "on", "and", ",", "of", "left", "right", "above", "below", "in", "front", "behind"):
                assert region == -1, (word, item["caption"])
            elif word in (*COLORS, *SHAPES, *SIZES, "person", "background"):
                assert 0 <= region <= len(scene.objects), (word, item["caption"])
            if word in COLORS and region > 0 and scene.objects[region - 1].kind != "person":
                pixels = item["image"][:, regions == region]
                nearest = (pixels.mean(1)[None] - palette).square().sum(1).argmin()
                assert COLORS[int(nearest)] == word, (word, item["caption"])
                named += 1
        assert set(item["word_regions"].tolist()) - {-1} == set(range(len(scene.objects) + 1))
    assert named > 30
    batch = collate([TorchDataset(data)[i] for i in range(4)])
    assert batch["regions"].shape == (4, 64, 64) and len(batch["word_regions"]) == 4


def test_save_folder_round_trips_through_the_folder_dataset(tmp_path):
    from ccm_sdk.datasets import ImageFolderDataset

    data = WorldDataset(size=32, length=10, seed=4)
    root = data.save_folder(tmp_path / "world", 3, start=2)
    assert sorted(p.name for p in root.glob("*.png")) == ["00002.png", "00003.png", "00004.png"]
    assert (root / "control" / "mask" / "00003.png").is_file()
    assert len((root / "scenes.jsonl").read_text().splitlines()) == 3
    folder = ImageFolderDataset(root, control_keys=[f"control/{c}" for c in WORLD_CONDITIONS])
    for position, index in enumerate(range(2, 5)):
        original, loaded = data[index], folder[position]
        assert loaded["caption"] == original["caption"]
        torch.testing.assert_close(loaded["image"], original["image"], rtol=0, atol=0)
        for name in WORLD_CONDITIONS:
            torch.testing.assert_close(loaded["controls"][f"control/{name}"], original["controls"][name], rtol=0, atol=0)


def test_bad_arguments_raise():
    with pytest.raises(UnknownNameError, match="unknown world condition 'segmentation'"):
        WorldDataset(conditions=("canny", "segmentation"))
    with pytest.raises(InputError, match="at least 16x16"):
        WorldDataset(size=8)
    with pytest.raises(InputError, match="sr_factor"):
        WorldDataset(size=32, sr_factor=64)
    with pytest.raises(InputError, match="length"):
        WorldDataset(length=0)
    with pytest.raises(IndexError):
        WorldDataset(length=3)[3]
    with pytest.raises(InputError, match="n >= 1"):
        WorldDataset(length=3).save_folder("unused", 0)


def test_plugin_registers_its_conditions_dataset_and_model_source():
    from ccm_sdk.errors import MissingModelError
    from ccm_sdk.registry import conditions, datasets, get_dataset, models

    plugins = {e.name: e.plugin for e in conditions.entries()}
    assert plugins["world-edges"] == "world" and plugins["world-soft-edges"] == "world"
    assert datasets.entry("world").plugin == "world" and datasets.get("world") is WorldDataset
    data = get_dataset("world", size=32, length=2, seed=3)
    assert data[1]["image"].shape == (3, 32, 32)
    assert models.entry("world").plugin == "world"
    with pytest.raises(MissingModelError, match="no pretrained model 'nope'"):
        models.get("world")("nope")


@pytest.fixture(scope="module")
def prompt_scenes():
    """48 scenes with their images, shape targets and limb targets."""
    data = WorldDataset(size=64, length=48, seed=4321, conditions=("pose",))
    items = [data[i] for i in range(len(data))]
    return data, items, [data.shape_targets(i) for i in range(len(data))], [data.limb_targets(i) for i in range(len(data))]


def test_shape_targets_real_images_score_about_1_and_flat_or_other_scenes_near_nothing(prompt_scenes):
    from ccm_sdk.eval.shape import shape_accuracy
    from ccm_world.vocabulary import SHAPES

    data, items, targets, _ = prompt_scenes
    images = torch.stack([item["image"] for item in items])
    for item, target in zip(items, targets):
        shapes = [o for o in item["scene"]["objects"] if o["kind"] != "person"]
        assert [SHAPES[k] for k in target.asked.tolist()] == [o["kind"] for o in shapes]
        assert target.candidates.shape[1:] == (len(SHAPES), 64, 64)
        # the asked candidate is where the object shows (up to anti-aliased edge pixels); the object is judged
        assert not (target.visible & ~target.allowed).any()
        for k, asked in enumerate(target.asked.tolist()):
            near = torch.nn.functional.max_pool2d(target.candidates[k, asked][None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
            assert not (target.visible[k] & ~near).any()
    assert sum(t.asked.numel() for t in targets) >= 60
    assert shape_accuracy(images, targets) >= 0.97
    flat = images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    assert shape_accuracy(flat, targets) == 0.0  # nothing stands out (chance among five shapes is 0.2)
    assert shape_accuracy(images.roll(1, 0), targets) <= 0.15  # another scene's image


def test_limb_targets_are_the_visible_arms_and_legs_and_the_true_pose_map_finds_them_all(prompt_scenes):
    from ccm_sdk.eval.limbs import limb_accuracy, limb_hits
    from ccm_world.dataset import LIMB_STICKS
    from ccm_world.scene import FIGURE_STICKS

    assert set(LIMB_STICKS) <= set(FIGURE_STICKS) and len(LIMB_STICKS) == 8
    data, items, _, targets = prompt_scenes
    for item, target in zip(items, targets):
        figures = [o for o in item["scene"]["objects"] if o["kind"] == "person"]
        assert target.detector == "world-pose" and target.segments.shape[0] <= 8 * len(figures)
    assert sum(t.segments.shape[0] for t in targets) >= 40
    poses = torch.stack([item["controls"]["pose"] for item in items])
    assert limb_accuracy(poses, targets) == 1.0  # the exact skeletons
    assert limb_accuracy(torch.zeros_like(poses), targets) == 0.0
    one = next(t for t in targets if t.segments.shape[0] == 8)
    index = targets.index(one)
    assert limb_hits(poses[index], one.segments) == (8, 8)
    left_arm = one.segments[[4, 5]]  # (5, 6) and (6, 7): erase that arm and the two are lost
    erased = poses[index].clone()
    for (x0, y0), (x1, y1) in left_arm.tolist():
        t = torch.linspace(0, 1, 50)
        xs, ys = (x0 + (x1 - x0) * t).long().clamp(0, 63), (y0 + (y1 - y0) * t).long().clamp(0, 63)
        for dx in range(-3, 4):
            for dy in range(-3, 4):
                erased[:, (ys + dy).clamp(0, 63), (xs + dx).clamp(0, 63)] = 0.0
    found, total = limb_hits(erased, one.segments)
    assert total == 8 and found <= 6


@pytest.mark.skipif(not (__import__("ccm_world").MODELS_DIR / "pose-net").is_dir(), reason="the world's pose net is not packed here")
def test_the_world_pose_net_finds_the_limbs_of_real_images_and_none_in_flat_ones(prompt_scenes):
    from ccm_sdk.eval.limbs import limb_accuracy
    from ccm_sdk.registry import get_condition

    _, items, _, targets = prompt_scenes
    images = torch.stack([item["image"] for item in items])
    pose = get_condition("world-pose")
    with torch.no_grad():
        assert limb_accuracy(pose(images), targets) >= 0.9
        flat = images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
        assert limb_accuracy(pose(flat), targets) <= 0.1
