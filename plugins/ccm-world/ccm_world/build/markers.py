"""The markers a world build leaves in each unit's folder: ``build-started.json`` when a run of it
starts and ``build-done.json`` once its outputs are complete, each naming the unit's fingerprint.

Both are written atomically, so a marker is there whole or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ccm_sdk.utils.atomic import write_json_atomic

DONE, STARTED = "build-done.json", "build-started.json"


def read_marker(folder: Path, name: str) -> dict[str, Any] | None:
    """The marker ``name`` in ``folder``, or None when it is missing or unreadable."""
    try:
        return json.loads((folder / name).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_marker(folder: Path, name: str, data: dict[str, Any]) -> None:
    write_json_atomic(folder / name, data)
