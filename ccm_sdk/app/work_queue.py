"""One generation at a time, in arrival order, with a bounded number of requests waiting.

A lock would serialise the model too, but Python's locks are not fair: under load one request
can wait while later ones keep winning. A FIFO queue served by one worker thread gives each
request its turn, and its bound turns overload into a quick "busy" answer instead of a wait
that grows without limit. A request whose client has gone by its turn (``submit``'s ``wanted``)
is skipped, so requests nobody waits for any more do not hold up those still waited for.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..errors import InputError, ServerBusyError


class WorkQueue:
    """Runs submitted calls one at a time on a worker thread; at most ``max_waiting`` wait behind the running one."""

    def __init__(self, max_waiting: int, *, name: str = "ccm-serve-worker"):
        if not isinstance(max_waiting, int) or isinstance(max_waiting, bool) or max_waiting < 1:
            raise InputError(f"the work queue needs room for at least 1 waiting request, got {max_waiting!r}")
        self.max_waiting = max_waiting
        self._name = name
        self._jobs: queue.Queue[tuple[Future, Callable[..., Any], tuple[Any, ...], Callable[[], bool] | None] | None] = queue.Queue(maxsize=max_waiting)
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.skipped = 0  # jobs not run because ``wanted`` said their client had gone

    @property
    def waiting(self) -> int:
        """How many submitted calls wait for their turn (the running one not counted)."""
        return self._jobs.qsize()

    def submit(self, fn: Callable[..., Any], *args: Any, wanted: Callable[[], bool] | None = None) -> Future:
        """Queue ``fn(*args)``; raises :class:`ServerBusyError` at once when the queue is full or closed.

        ``wanted``: asked just before ``fn`` would run; when it answers False (the client that asked
        has gone) ``fn`` is skipped and the future is cancelled, so the turn goes to the next request.
        A ``wanted`` that raises counts as True: the work runs.
        """
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise ServerBusyError("the server is shutting down and takes no more work")
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._worker.start()
            try:
                self._jobs.put_nowait((future, fn, args, wanted))
            except queue.Full:
                raise ServerBusyError(f"the server is busy: {self.max_waiting} request(s) already wait for the one being "
                                      "generated; send it again in a moment") from None
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, wanted = job
            if not _still_wanted(wanted):
                future.cancel()
                self.skipped += 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the waiting request, which answers for it
                future.set_exception(exc)

    def close(self, timeout: float | None = 5.0) -> None:
        """Refuse new work, let the queued work finish, and stop the worker (waits up to ``timeout`` seconds)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            worker = self._worker
        if worker is not None:
            self._jobs.put(None)
            worker.join(timeout)


def _still_wanted(wanted: Callable[[], bool] | None) -> bool:
    if wanted is None:
        return True
    try:
        return bool(wanted())
    except Exception:  # a check that fails must not drop a request that may still be waited for
        return True
