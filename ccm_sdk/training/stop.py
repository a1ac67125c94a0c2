"""Stopping a training run cleanly: SIGTERM or SIGUSR1 makes the loop checkpoint the step it has
reached and stop, so that nothing since the last periodic checkpoint is lost (a preempted machine,
a session that ends, ``kill <pid>``). A second signal while stopping is left to the old handler.

The handlers are installed for the loop only, and only from the main thread (Python allows no
other). With several processes the decision is collective: if any process got the signal, all of
them checkpoint together at the same step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


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
        """Whether any process was asked to stop (a collective call when there are several)."""
        flag = self.name is not None
        if accelerator is None or accelerator.num_processes == 1:
            return flag
        from accelerate.utils import reduce

        return bool(reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())
