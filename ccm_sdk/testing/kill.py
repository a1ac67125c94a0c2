"""Kill a training process the hard way once it has written a checkpoint, for exact-resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from ..training import list_checkpoints


def kill_after_checkpoint(process: subprocess.Popen, checkpoints: str | os.PathLike, *, step: int, timeout: float = 120) -> int:
    """SIGKILL ``process`` as soon as ``checkpoints`` holds a checkpoint at ``step`` or later; the
    newest step it left. Fails (AssertionError) if the process ends first or nothing appears in time."""
    deadline = time.monotonic() + timeout
    while not any(s >= step for s, _ in list_checkpoints(checkpoints)):
        assert process.poll() is None, process.stderr.read() if process.stderr else "the process ended"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return list_checkpoints(checkpoints)[-1][0]
