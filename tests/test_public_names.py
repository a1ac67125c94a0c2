"""Every name a package lists in ``__all__`` exists (ccm_sdk's packages and the world plugin's)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"ccm_sdk": ROOT / "ccm_sdk", "ccm_world": ROOT / "plugins" / "ccm-world" / "ccm_world"}


def packages() -> list[str]:
    found = []
    for top, folder in FOLDERS.items():
        for init in sorted(folder.rglob("__init__.py")):
            found.append(".".join([top, *init.parent.relative_to(folder).parts]))
    return found


@pytest.mark.parametrize("name", packages())
def test_every_name_in_all_exists(name):
    package = importlib.import_module(name)
    listed = getattr(package, "__all__", [])
    assert len(listed) == len(set(listed)), f"{name}.__all__ lists a name twice"
    missing = [item for item in listed if not hasattr(package, item)]
    assert missing == [], f"{name}.__all__ lists names it does not have: {missing}"


def test_the_packages_are_found():
    assert {"ccm_sdk", "ccm_sdk.training", "ccm_sdk.eval", "ccm_sdk.utils", "ccm_world", "ccm_world.build"} <= set(packages())
