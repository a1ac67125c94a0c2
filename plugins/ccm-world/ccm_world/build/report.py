"""What a world build reports: one :class:`StageReport` per unit, and durations as people read them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StageReport:
    """What happened to one unit in a run."""

    unit: str
    status: str  # built, resumed, skipped, installed
    seconds: float
    output: str
    seconds_per_step: float | None = None
    steps: int | None = None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
