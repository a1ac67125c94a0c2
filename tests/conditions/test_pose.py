"""The pose condition through the installed ccm-condition-pose plugin (its own tests cover the pipeline)."""

from __future__ import annotations

import pytest

from ccm_sdk import cli, get_condition
from ccm_sdk.testing.conditions import assert_registered_through_entry_point, sample_photos

pose = pytest.importorskip("ccm_condition_pose", reason="ccm-condition-pose is not installed")


def test_found_through_its_entry_point():
    assert_registered_through_entry_point("pose", "ccm-condition-pose")


def test_listed_by_ccm_conditions(capsys):
    cli.main(["conditions"])
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "[pose]" in listed["pose"]


def test_tiny_model_from_disk_through_get_condition(tmp_path):
    condition = get_condition("pose", model=str(pose.build_tiny_pose_model(tmp_path / "pose")), threshold=0.0)
    out = condition(sample_photos((96, 64), 2))
    assert out.shape == (2, 3, 96, 64)
    assert (out.sum(dim=1) > 0).any()
