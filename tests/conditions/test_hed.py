"""The hed condition through the installed ccm-condition-hed plugin (its own tests cover the network)."""

from __future__ import annotations

import pytest

from ccm_sdk import cli, get_condition
from ccm_sdk.testing.conditions import assert_registered_through_entry_point, sample_photos

hed = pytest.importorskip("ccm_condition_hed", reason="ccm-condition-hed is not installed")


def test_found_through_its_entry_point():
    assert_registered_through_entry_point("hed", "ccm-condition-hed")


def test_listed_by_ccm_conditions(capsys):
    cli.main(["conditions"])
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "[hed]" in listed["hed"]


def test_tiny_network_from_disk_through_get_condition(tmp_path):
    condition = get_condition("hed", model=str(hed.build_tiny_hed(tmp_path / "hed")), output_size=(32, 48))
    out = condition(sample_photos((64, 96), 2))
    assert out.shape == (2, 3, 32, 48) and 0 <= out.min() and out.max() <= 1
