"""docs/writing-a-condition-plugin.md works as written: its files install and register a condition."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parents[2] / "docs" / "writing-a-condition-plugin.md"
TITLED_BLOCK = re.compile(r'^```\w* title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)

CHECK = """
import sys
import pytest
import ccm_sdk
from ccm_sdk import registry

condition = ccm_sdk.get_condition("luminance", gamma=2.0)
entry = registry.conditions.entry("luminance")
assert entry.plugin == "luminance", entry
assert type(condition).__module__ == "ccm_condition_luminance"
assert sys.modules["ccm_condition_luminance"].__file__.startswith(sys.argv[1])  # the installed copy
print("found", type(condition).__name__, condition.options.gamma)
sys.exit(pytest.main([sys.argv[2], "-q", "-p", "no:cacheprovider"]))
"""


def doc_files() -> dict[str, str]:
    return {name: body for name, body in TITLED_BLOCK.findall(DOC.read_text())}


def test_the_doc_has_every_file_of_the_package():
    assert set(doc_files()) == {
        "ccm-condition-luminance/pyproject.toml",
        "ccm-condition-luminance/README.md",
        "ccm-condition-luminance/ccm_condition_luminance.py",
        "ccm-condition-luminance/tests/test_luminance.py",
    }


@pytest.mark.slow
def test_walkthrough_installs_registers_and_passes_its_tests(tmp_path):
    for name, body in doc_files().items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    project, target = tmp_path / "ccm-condition-luminance", tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(project),
        ],
        check=True,
        capture_output=True,
    )
    assert list(target.glob("ccm_condition_luminance-0.1.0.dist-info/entry_points.txt"))
    env = {**os.environ, "PYTHONPATH": str(target), "CCM_STRICT_PLUGINS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(target), str(project / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "found LuminanceCondition 2.0" in result.stdout
    assert re.search(r"\b(\d+) passed\b", result.stdout) and " failed" not in result.stdout
