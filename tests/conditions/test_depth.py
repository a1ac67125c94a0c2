"""The depth condition through the installed ccm-condition-depth plugin (its own tests cover the models)."""

from __future__ import annotations

import pytest

from ccm_sdk import cli, get_condition
from ccm_sdk.testing.conditions import assert_registered_through_entry_point, sample_photos

depth = pytest.importorskip("ccm_condition_depth", reason="ccm-condition-depth is not installed")


def test_found_through_its_entry_point():
    assert_registered_through_entry_point("depth", "ccm-condition-depth")


def test_listed_by_ccm_conditions(capsys):
    cli.main(["conditions"])
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "[depth]" in listed["depth"]


def test_tiny_model_from_disk_through_get_condition(tmp_path):
    folder = depth.build_tiny_depth_model(tmp_path / "depth", kind="dpt")
    out = get_condition("depth", model=str(folder))(sample_photos((64, 96), 2))
    assert out.shape == (2, 3, 64, 96)
    assert out.amin(dim=(1, 2, 3)).eq(0).all() and out.amax(dim=(1, 2, 3)).eq(1).all()
