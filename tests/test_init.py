"""``import ccm_sdk`` and the ``ccm`` command's help stay light (no torch); the main names resolve lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ccm_sdk

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_import_and_help_do_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "import ccm_sdk\n"
            "assert 'torch' not in sys.modules, 'import ccm_sdk imported torch'\n"
            "from ccm_sdk import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "    cli.main(['--help'])\n"
            "assert 'generate' in out.getvalue()\n"
            "assert 'torch' not in sys.modules, 'ccm --help imported torch'\n"
            "print('light')")  # fmt: skip
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("light")


def test_main_names_resolve_from_the_top_level():
    from ccm_sdk.errors import MissingModelError
    from ccm_sdk.pipeline import CCMPipeline as Direct

    from ccm_sdk import CCMPipeline, get_sampler  # noqa: I001 (the lazy names under test)

    assert CCMPipeline is Direct
    assert ccm_sdk.MissingModelError is MissingModelError
    assert get_sampler("consistency") is not None
    for name in ccm_sdk.__all__:
        assert getattr(ccm_sdk, name) is not None, name
    assert set(ccm_sdk.__all__) <= set(dir(ccm_sdk))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        ccm_sdk.NoSuchThing  # noqa: B018
    with pytest.raises(ImportError):
        from ccm_sdk import NoSuchThing  # noqa: F401
