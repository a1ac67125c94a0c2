"""Every first-party package under plugins/ installs with pip and is found through its entry point."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PLUGIN_DIRS = sorted(p for p in (Path(__file__).parents[1] / "plugins").iterdir() if (p / "pyproject.toml").is_file())


def test_there_are_first_party_plugins():
    assert PLUGIN_DIRS, "plugins/ should hold at least one plugin package"


@pytest.mark.slow
@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=lambda p: p.name)
def test_pip_install_and_discovery_through_entry_point(tmp_path, plugin_dir):
    project = tomllib.loads((plugin_dir / "pyproject.toml").read_text())["project"]
    entry_points = project["entry-points"]["ccm_sdk"]
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(plugin_dir)],
        check=True,
        capture_output=True,
    )
    for ep_name, module_name in entry_points.items():
        code = (
            "import importlib, sys\n"
            "from ccm_sdk import plugins\n"
            "from ccm_sdk.registry import conditions\n"
            f"names = [e.name for e in conditions.entries() if e.plugin == {ep_name!r}]\n"
            f"module = importlib.import_module({module_name!r})\n"
            "assert not plugins.plugin_failures(), plugins.plugin_failures()\n"
            "print(module.__file__); print(','.join(names))\n"
        )
        env = {"PYTHONPATH": str(target), "CCM_PLUGINS": ep_name, "HF_HUB_OFFLINE": "1", "PATH": ""}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        module_file, names = out.stdout.strip().splitlines()
        assert module_file.startswith(str(target)), "the installed copy, not the source tree, was imported"
        assert names, f"entry point {ep_name!r} registered no condition"
