"""The world's map nets: the depth net learns layer depth and the pose net the skeletons from
pixels, round-trip through their folders, fail clearly on bad input, and serve as the
``world-depth`` and ``world-pose`` conditions (h for Fidelity)."""

from __future__ import annotations

import json

import pytest
import torch

from ccm_sdk import get_condition
from ccm_sdk.errors import CorruptWeightsError, InputError, MissingModelError
from ccm_world import WorldDataset
from ccm_world.map_net import MapNetConfig, WorldMapNet, train_map_net, weighted_l1

NET = {"widths": (8, 16), "groups": 4}


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(2)
    world = WorldDataset(size=32, length=448, seed=3, conditions=("depth", "pose"))
    return [world[i] for i in range(len(world))]  # rendered once: the steps revisit them


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("depth") / "depth-net"
    result = train_map_net(world, steps=120, batch_size=16, lr=3e-3, seed=0, holdout=64, output_dir=folder, **NET)
    return result, folder


def _untrained(**config) -> WorldMapNet:
    torch.manual_seed(0)  # the untrained net train_map_net starts from
    return WorldMapNet(MapNetConfig(**NET, **config)).eval()


def test_the_depth_net_learns_depth_on_scenes_it_never_saw(world, trained):
    result, _ = trained
    images = torch.stack([item["image"] for item in world[-64:]])
    depths = torch.stack([item["controls"]["depth"][:1] for item in world[-64:]])
    with torch.no_grad():
        before = (_untrained()(images) - depths).abs().mean().item()
    assert result.holdout_l1 < 0.5 * before
    assert sum(result.losses[-10:]) < 0.5 * sum(result.losses[:10])


def test_the_pose_net_draws_skeletons_where_the_figures_are(world, tmp_path):
    result = train_map_net(world, target="pose", channels=3, foreground_weight=20.0, steps=150, batch_size=16, lr=3e-3,
                           seed=0, holdout=64, output_dir=tmp_path / "pose-net", **NET)  # fmt: skip
    held_out = [item for item in world[-64:] if item["controls"]["pose"].amax() > 0]
    images = torch.stack([item["image"] for item in held_out])
    poses = torch.stack([item["controls"]["pose"] for item in held_out])
    with torch.no_grad():
        predicted, before = result.net(images), _untrained(target="pose", channels=3)(images)
    limbs = poses.amax(1, keepdim=True) > 0
    background = ~limbs
    # brighter on the true limbs than on the background, and far closer to the true maps than at the start
    assert predicted.amax(1, keepdim=True)[limbs].mean() > 2 * predicted.amax(1, keepdim=True)[background].mean()
    assert (predicted - poses).abs().mean() < 0.5 * (before - poses).abs().mean()
    maps = get_condition("world-pose", model=str(tmp_path / "pose-net"))(images[:2])
    assert maps.shape == (2, 3, 32, 32) and torch.allclose(maps, predicted[:2], atol=1e-6)


def test_weighted_l1_by_hand():
    target = torch.zeros(1, 3, 2, 2)
    target[0, 1, 0, 0] = 1.0  # one foreground pixel
    predicted = torch.full((1, 3, 2, 2), 0.5)
    assert weighted_l1(predicted, target).item() == pytest.approx(0.5)
    # weights 5 on the foreground pixel, 1 elsewhere: (5 * 1.5 + 3 * 1.5) / ((5 + 3) * 3) = 0.5
    assert weighted_l1(predicted, target, 4.0).item() == pytest.approx(0.5)
    predicted[0, 1, 0, 0] = 1.0  # right on the foreground now: only background errors, weight 1 of 8
    assert weighted_l1(predicted, target, 4.0).item() == pytest.approx((3 * 1.5 + 5 * 1.0) / 24)


def test_round_trip_and_the_condition_give_the_same_depth(world, trained):
    result, folder = trained
    images = torch.stack([item["image"] for item in world[:3]])
    loaded = WorldMapNet.from_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["widths"] == [8, 16] and saved["target"] == "depth" and saved["channels"] == 1
    with torch.no_grad():
        expected = result.net(images)
        assert torch.equal(loaded(images), expected)
    maps = get_condition("world-depth", model=str(folder))(images)
    assert maps.shape == (3, 3, 32, 32) and torch.allclose(maps[:, 1], expected[:, 0], atol=1e-6)
    with pytest.raises(InputError, match="world-pose needs a net that predicts 'pose' maps; this one predicts 'depth'"):
        get_condition("world-pose", model=str(folder))


def test_bad_input_and_missing_or_corrupt_folders(trained, tmp_path):
    result, folder = trained
    with pytest.raises(InputError, match=r"expected images \[B, 3, H, W\]"):
        result.net(torch.rand(1, 4, 32, 32))
    with pytest.raises(InputError, match="multiples of 2"):
        result.net(torch.rand(1, 3, 31, 32))
    with pytest.raises(MissingModelError, match="map net folder"):
        WorldMapNet.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CorruptWeightsError, match="cannot load the map net"):
        WorldMapNet.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="divisible by groups"):
        WorldMapNet(MapNetConfig(widths=(6, 12), groups=4))
    with pytest.raises(InputError, match=r"controls\['depth'\]"):
        train_map_net(WorldDataset(size=32, length=8, seed=0, conditions=("canny",)), steps=1, batch_size=2)
    with pytest.raises(InputError, match=r"controls\['depth'\] has 3 channels; the net predicts 4"):
        train_map_net(WorldDataset(size=32, length=8, seed=0, conditions=("depth",)), channels=4, steps=1, batch_size=2)
    with pytest.raises(InputError, match="foreground_weight must be >= 0"):
        train_map_net(WorldDataset(size=32, length=8, seed=0, conditions=("depth",)), foreground_weight=-1, steps=1, batch_size=2)


def test_the_default_models_are_the_shipped_ones(monkeypatch, tmp_path):
    import ccm_world

    monkeypatch.setattr(ccm_world, "MODELS_DIR", tmp_path)  # nothing packed here
    with pytest.raises(MissingModelError, match="no pretrained model 'depth-net'"):
        get_condition("world-depth")
    with pytest.raises(MissingModelError, match="no pretrained model 'pose-net'"):
        get_condition("world-pose")
