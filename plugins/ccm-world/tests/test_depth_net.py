"""The world's depth estimator: it learns layer depth from pixels, round-trips through its folder,
fails clearly on bad input, and serves as the ``world-depth`` condition (h for depth Fidelity)."""

from __future__ import annotations

import json

import pytest
import torch

from ccm_sdk import get_condition
from ccm_sdk.errors import CorruptWeightsError, InputError, MissingModelError
from ccm_world import WorldDataset
from ccm_world.depth_net import DepthNetConfig, WorldDepthNet, train_depth_net


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(2)
    world = WorldDataset(size=32, length=448, seed=3, conditions=("depth",))
    data = [world[i] for i in range(len(world))]  # rendered once: the steps revisit them
    folder = tmp_path_factory.mktemp("depth") / "depth-net"
    result = train_depth_net(data, steps=120, batch_size=16, lr=3e-3, seed=0, holdout=64, widths=(8, 16), groups=4, output_dir=folder)
    return data, result, folder


def test_it_learns_depth_on_scenes_it_never_saw(trained):
    data, result, _ = trained
    torch.manual_seed(0)  # the untrained net train_depth_net starts from
    untrained = WorldDepthNet(DepthNetConfig(widths=(8, 16), groups=4)).eval()
    images = torch.stack([item["image"] for item in data[-64:]])
    depths = torch.stack([item["controls"]["depth"][:1] for item in data[-64:]])
    with torch.no_grad():
        before = (untrained(images) - depths).abs().mean().item()
    assert result.holdout_l1 < 0.5 * before
    assert sum(result.losses[-10:]) < 0.5 * sum(result.losses[:10])


def test_round_trip_and_the_condition_give_the_same_depth(trained):
    data, result, folder = trained
    images = torch.stack([item["image"] for item in data[:3]])
    loaded = WorldDepthNet.from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["widths"] == [8, 16]
    with torch.no_grad():
        expected = result.net(images)
        assert torch.equal(loaded(images), expected)
    maps = get_condition("world-depth", model=str(folder))(images)
    assert maps.shape == (3, 3, 32, 32) and torch.allclose(maps[:, 1], expected[:, 0], atol=1e-6)


def test_bad_input_and_missing_or_corrupt_folders(trained, tmp_path):
    _, result, folder = trained
    with pytest.raises(InputError, match=r"expected images \[B, 3, H, W\]"):
        result.net(torch.rand(1, 4, 32, 32))
    with pytest.raises(InputError, match="multiples of 2"):
        result.net(torch.rand(1, 3, 31, 32))
    with pytest.raises(MissingModelError, match="depth net folder"):
        WorldDepthNet.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CorruptWeightsError, match="cannot load the depth net"):
        WorldDepthNet.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="divisible by groups"):
        WorldDepthNet(DepthNetConfig(widths=(6, 12), groups=4))
    with pytest.raises(InputError, match=r"controls\['depth'\]"):
        train_depth_net(WorldDataset(size=32, length=8, seed=0, conditions=("canny",)), steps=1, batch_size=2)


def test_the_default_model_is_the_shipped_one(monkeypatch, tmp_path):
    import ccm_world

    monkeypatch.setattr(ccm_world, "MODELS_DIR", tmp_path)  # nothing packed here
    with pytest.raises(MissingModelError, match="no pretrained model 'depth-net'"):
        get_condition("world-depth")
