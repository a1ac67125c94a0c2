"""Stopping a long run cleanly: SIGTERM or SIGUSR1 makes a training loop checkpoint the step it has
reached and stop (an evaluation keeps its finished cells, a world build its finished stages), so
that nothing since the last checkpoint is lost (a preempted machine, a session that ends,
``kill <pid>``). A second signal while stopping is left to the old handler. A time limit
(``with time_limit(seconds):``, ``--stop-after 2h``) stops it the same way once it runs out, for
machines lent for a fixed time.

The handlers are installed for the loop only, and only from the main thread (Python allows no
other). With several processes the decision is collective: if any process got the signal, all of
them checkpoint together at the same step.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic
from types import FrameType

import torch

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)
TIME_LIMIT = "the time limit"  # StopSignals.name once the time limit has run out

_deadline: float | None = None  # monotonic() at which training loops stop; None: no limit


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block, a training loop checkpoints and stops (as on SIGTERM) once ``seconds`` have passed."""
    global _deadline
    if seconds is not None and not seconds > 0:
        from ..errors import InputError

        raise InputError(f"a time limit must be a positive number of seconds, got {seconds!r}")
    previous = _deadline
    _deadline = None if seconds is None else monotonic() + seconds
    try:
        yield
    finally:
        _deadline = previous


def time_left() -> float | None:
    """Seconds until the time limit set by :func:`time_limit` runs out (None without one; 0 once it has)."""
    return None if _deadline is None else max(0.0, _deadline - monotonic())


def time_limit_reached() -> bool:
    """Whether the time limit set by :func:`time_limit` has run out (False without one)."""
    return _deadline is not None and monotonic() >= _deadline


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"45s"``, ``"20m"``, ``"2h"`` or ``"1h30m"``."""
    from ..errors import InputError

    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif re.fullmatch(r"(\d+(\.\d+)?[hms])+", value):
        units = {"h": 3600.0, "m": 60.0, "s": 1.0}
        seconds = sum(float(number) * units[unit] for number, unit in re.findall(r"(\d+(?:\.\d+)?)([hms])", value))
    else:
        raise InputError(f"expected a duration like 90 (seconds), 45s, 20m, 2h or 1h30m, got {text!r}")
    if seconds <= 0:
        raise InputError(f"a duration must be more than zero, got {text!r}")
    return seconds


class StopSignals:
    """A context manager that records stop signals instead of dying on them."""

    def __init__(self):
        self.name: str | None = None  # the signal received, e.g. "SIGTERM"
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.name is not None:  # asked twice: let the previous handler act (SIGTERM's default ends the process)
            previous = self._previous.get(number)
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
            signal.raise_signal(number)
            return
        self.name = signal.Signals(number).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)

    def requested(self, accelerator=None) -> bool:
        """Whether any process was asked to stop, or the time limit ran out (a collective call when there are several)."""
        if self.name is None and time_limit_reached():
            self.name = TIME_LIMIT
        flag = self.name is not None
        if accelerator is None or accelerator.num_processes == 1:
            return flag
        from accelerate.utils import reduce

        return bool(reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())
