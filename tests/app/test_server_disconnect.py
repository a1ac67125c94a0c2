"""Requests whose client has gone before their turn are skipped, so they starve no one
(:class:`~ccm_sdk.app.work_queue.WorkQueue`'s ``wanted`` and :func:`~ccm_sdk.app.server.client_gone`)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import CancelledError

import json

import pytest
from PIL import Image

from ccm_sdk.app.server import GenerationService, client_gone, encode_png
from ccm_sdk.app.work_queue import WorkQueue


def test_the_queue_skips_work_nobody_wants_any_more():
    work, gate, started, ran = WorkQueue(4), threading.Event(), threading.Event(), []

    def job(n):
        ran.append(n)
        if n == 0:
            started.set()
            assert gate.wait(10)
        return n

    def broken_check():
        raise RuntimeError("cannot tell")

    first = work.submit(job, 0, wanted=lambda: True)
    assert started.wait(10)
    gone = work.submit(job, 1, wanted=lambda: False)
    kept = work.submit(job, 2, wanted=lambda: True)
    unsure = work.submit(job, 3, wanted=broken_check)  # a check that fails keeps the request
    plain = work.submit(job, 4)
    gate.set()
    assert [f.result(10) for f in (first, kept, unsure, plain)] == [0, 2, 3, 4]
    assert gone.cancelled() and ran == [0, 2, 3, 4] and work.skipped == 1
    with pytest.raises(CancelledError):
        gone.result(0)
    work.close()


def test_wanted_is_asked_at_the_turn_not_at_submission():
    work, gate, started, ran = WorkQueue(2), threading.Event(), threading.Event(), []
    present = {"answer": True}

    def hold():
        started.set()
        assert gate.wait(10)

    work.submit(hold)
    assert started.wait(10)
    later = work.submit(ran.append, "later", wanted=lambda: present["answer"])
    present["answer"] = False  # the client leaves while it waits
    gate.set()
    with pytest.raises(CancelledError):
        later.result(10)
    assert ran == []
    work.close()


def test_client_gone_reads_the_socket_without_consuming_it():
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        assert not client_gone(server_side)  # connected, nothing sent
        client_side.sendall(b"GET")
        assert not client_gone(server_side)  # a next request waiting is not a goodbye
        assert server_side.recv(3) == b"GET"  # and the peek left it there
        client_side.close()
        assert client_gone(server_side)
    assert client_gone(server_side)  # closed on this side too


class _GatedPipe:
    """The pipeline, but each call notes its seed, says it started and then waits for ``gate``."""

    def __init__(self, pipe):
        self._pipe, self.started, self.gate, self.seeds = pipe, threading.Semaphore(0), threading.Event(), []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self.seeds.append(kwargs["generator"].initial_seed())
        self.started.release()
        assert self.gate.wait(30)
        return self._pipe(*args, **kwargs)


def _request(server, seed: int) -> bytes:
    body = json.dumps({"prompt": "x", "control": encode_png(Image.new("RGB", (64, 64))), "steps": 1, "seed": seed}).encode()
    return (f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{server.server_address[1]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _status(sock: socket.socket) -> int:
    """Reads the answer to the end (the server closes after it); its status code."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return int(b"".join(chunks).split(b" ", 2)[1])


def _wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_abandoned_requests_are_skipped_and_the_waiting_one_is_served(pipe, serve):
    gated = _GatedPipe(pipe)
    service = GenerationService(gated, model="tiny", max_queue=3)
    with serve(service) as server:
        address = server.server_address[:2]
        with socket.create_connection(address, timeout=60) as first:
            first.sendall(_request(server, 1))
            assert gated.started.acquire(timeout=30)  # request 1 holds the worker
            leaving = [socket.create_connection(address, timeout=30) for _ in range(2)]
            for seed, sock in zip((2, 3), leaving):  # two clients send, then give up before their turn
                sock.sendall(_request(server, seed))
            assert _wait_for(lambda: service._queue.waiting == 2)
            for sock in leaving:
                sock.close()
            with socket.create_connection(address, timeout=60) as staying:
                staying.sendall(_request(server, 4))
                assert _wait_for(lambda: service._queue.waiting == 3)
                gated.gate.set()
                assert _status(first) == 200
                assert _status(staying) == 200
        assert gated.seeds == [1, 4]  # 2 and 3 never reached the model
        assert service._queue.skipped == 2
