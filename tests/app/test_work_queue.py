"""The bounded FIFO queue in front of ``ccm serve``'s model (:mod:`ccm_sdk.app.work_queue`)."""

from __future__ import annotations

import threading

import pytest

from ccm_sdk.app.work_queue import WorkQueue
from ccm_sdk.errors import InputError, ServerBusyError


def test_runs_one_at_a_time_in_arrival_order_and_refuses_when_full():
    work, gate, order, running = WorkQueue(3), threading.Event(), [], []
    busy = threading.Semaphore(0)

    def job(n):
        running.append(n)
        assert len(running) == 1, "two jobs ran at once"
        if n == 0:
            busy.release()
            gate.wait(10)
        order.append(n)
        running.remove(n)
        return n * 10

    futures = [work.submit(job, 0)]
    assert busy.acquire(timeout=10)  # job 0 runs and holds the worker; 3 more may wait
    futures += [work.submit(job, n) for n in (1, 2, 3)]
    assert work.waiting == 3
    with pytest.raises(ServerBusyError, match="the server is busy: 3 request"):
        work.submit(job, 4)
    gate.set()
    assert [f.result(10) for f in futures] == [0, 10, 20, 30]
    assert order == [0, 1, 2, 3]
    assert work.submit(job, 5).result(10) == 50  # room again
    work.close()
    with pytest.raises(ServerBusyError, match="shutting down"):
        work.submit(job, 6)


def test_errors_reach_the_caller_and_the_worker_goes_on():
    work = WorkQueue(1)

    def fail():
        raise InputError("bad")

    with pytest.raises(InputError, match="bad"):
        work.submit(fail).result(10)
    assert work.submit(lambda: "ok").result(10) == "ok"
    work.close()


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_the_bound_must_be_a_positive_count(size):
    with pytest.raises(InputError, match="at least 1 waiting request"):
        WorkQueue(size)
