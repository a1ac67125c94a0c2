"""The world as the eval runner's dataset: a briefly trained feature net and one method on tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from ccm_sdk.eval import load_eval_config, run_evaluation, train_feature_net
from ccm_sdk.testing import tiny
from ccm_world import ATTRIBUTE_NAMES, WorldDataset


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world-net") / "net"
    data = WorldDataset(size=32, length=600, seed=0, conditions=())
    result = train_feature_net(data, steps=25, batch_size=16, lr=5e-3, holdout=64, widths=(8, 16, 32), feature_dim=32,
                               label_names=ATTRIBUTE_NAMES, output_dir=folder)  # fmt: skip
    return folder, result


def test_feature_net_learns_world_attributes(feature_net):
    _, result = feature_net
    # 25 steps only show that it learns; most attributes are absent from any one scene, so the
    # first thing learned is how rare each is (scripts/train_feature_net.py trains the real one)
    assert np.mean(result.losses[-5:]) < 0.85 * np.mean(result.losses[:5])
    assert result.accuracy > 0.7


def test_runner_on_the_world_with_ground_truth_edges(feature_net, tmp_path):
    model = tiny.save_tiny_pipeline(tmp_path / "lcm")
    controlnet = tiny.save_tiny_controlnet(tmp_path / "cn", model)
    config = load_eval_config({
        "output_dir": str(tmp_path / "out"),
        "dataset": {"name": "world", "options": {"size": 32, "length": 16, "seed": 1}},
        "num_samples": 4, "device": "cpu", "warmup": False,
        "features": {"kind": "feature-net", "path": str(feature_net[0])},
        "conditions": [{"name": "world-edges", "control": "dataset", "key": "canny", "label": "edges"},
                       {"name": "sr", "options": {"factor": 4}}],
        "methods": [{"name": "tiny CM", "model": str(model), "controlnets": {"edges": str(controlnet), "sr": str(controlnet)},
                     "steps": [1]}],
    })  # fmt: skip
    result = run_evaluation(config, log=None)
    assert [r.condition for r in result.rows] == ["edges", "sr"]
    assert result.feature_extractor == "feature-net"
    assert 0 < result.real_fidelity["edges"] < 0.05  # the exact edges vs the edges read from pixels
    assert result.real_fidelity["sr"] == 0.0
    assert (tmp_path / "out" / "results.md").exists() is False and result.write()["markdown"].is_file()
