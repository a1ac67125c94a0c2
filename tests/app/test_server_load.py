"""A bounded load test of ``ccm serve`` on loopback: valid requests keep their answers and their pace
while oversized, malformed, foreign and stalled clients hit the server at the same time."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from collections import defaultdict

import numpy as np
from PIL import Image

from ccm_sdk.app.server import GenerationService

READ_TIMEOUT = 2.0  # how long a stalled client holds its own connection
VALID_CLIENTS, VALID_EACH = 4, 40  # fewer than the queue's room: no valid request may be told "busy"


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bomb() -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 30001 * 8)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _request(port: int, body: bytes | dict, *, headers: dict | None = None, method: str = "POST", path: str = "/api/generate") -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    fields = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode() + body


def _exchange(address, data: bytes, *, timeout: float = 30.0) -> int:
    """Sends ``data``, reads the answer to its end; the status, or 0 when the server closed without one."""
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            return 0
    answer = b"".join(chunks)
    return int(answer.split(b" ", 2)[1]) if answer else 0


def test_valid_requests_keep_being_answered_under_mixed_load(pipe, serve):
    sketch = np.zeros((64, 64, 3), np.uint8)
    sketch[16:48, 16] = sketch[16:48, 47] = sketch[16, 16:48] = sketch[47, 16:48] = 255
    control = _png(Image.fromarray(sketch))
    service = GenerationService(pipe, model="tiny", max_queue=VALID_CLIENTS * 2)
    results: dict[str, list[tuple[int, float, float]]] = defaultdict(list)  # kind -> (status, start, seconds)
    lock = threading.Lock()

    with serve(service, read_timeout=READ_TIMEOUT) as server:
        address, port = server.server_address[:2], server.server_address[1]
        bad = {
            "oversized image": (_request(port, {"prompt": "x", "control": _png(Image.new("RGB", (1024, 1024))), "steps": 1}), {413}),
            "announced 1 GB": (_request(port, b"{}", headers={"Content-Length": str(10**9)}), {413, 0}),
            "decompression bomb": (_request(port, {"prompt": "x", "control": _bomb(), "steps": 1}), {413}),
            "foreign Host": (_request(port, {"prompt": "x"}, headers={"Host": f"evil.example:{port}"}), {403}),
            "foreign Origin": (_request(port, {"prompt": "x", "control": control}, headers={"Origin": "http://evil.example"}), {403}),
            "text/plain": (_request(port, {"prompt": "x", "control": control}, headers={"Content-Type": "text/plain"}), {415}),
            "malformed JSON": (_request(port, b"{not json"), {400}),
            "bad field": (_request(port, {"prompt": "x", "control": control, "steps": 0}), {400}),
        }

        def record(kind: str, status: int, start: float) -> None:
            with lock:
                results[kind].append((status, start, time.monotonic() - start))

        def valid_client(client: int) -> None:
            for i in range(VALID_EACH):
                body = {"prompt": "a square", "control": control, "steps": 1, "seed": client * 1000 + i}
                start = time.monotonic()
                record("valid", _exchange(address, _request(port, body)), start)

        def bad_client(kind: str, rounds: int) -> None:
            data, _ = bad[kind]
            for _ in range(rounds):
                start = time.monotonic()
                record(kind, _exchange(address, data), start)

        def stalled_client(rounds: int) -> None:
            for _ in range(rounds):  # announces 1000 bytes, sends 10, waits to be dropped
                start = time.monotonic()
                record("stalled", _exchange(address, _request(port, b"x" * 1000)[:-990]), start)

        def dripping_client() -> None:  # a header byte every 0.1 s: each read is quick, the request never ends
            start, dropped = time.monotonic(), False
            with socket.create_connection(address, timeout=30) as sock:
                sock.settimeout(0.1)
                sock.sendall(b"GET /api/info HTTP/1.1\r\n")
                while not dropped and time.monotonic() - start < 4 * READ_TIMEOUT:
                    try:
                        sock.sendall(b"X")
                        dropped = sock.recv(1) == b""
                    except TimeoutError:
                        continue
                    except OSError:
                        dropped = True
            record("dripping", int(dropped), start)

        failures = []

        def guarded(target, *args) -> None:  # a client that fails fails the test
            try:
                target(*args)
            except BaseException as exc:
                failures.append(f"{target.__name__}{args}: {exc!r}")

        jobs = [(valid_client, c) for c in range(VALID_CLIENTS)] + [(bad_client, kind, 15) for kind in bad]
        jobs += [(stalled_client, 2)] * 3 + [(dripping_client,)] * 2
        threads = [threading.Thread(target=guarded, args=job) for job in jobs]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == []
        took = time.monotonic() - began

        # after the load, the server still answers at once
        assert _exchange(address, _request(port, {"prompt": "after", "control": control, "steps": 1})) == 200

    valid = results["valid"]
    assert len(valid) == VALID_CLIENTS * VALID_EACH
    assert sum(len(v) for v in results.values()) >= 250
    statuses = sorted({status for status, _, _ in valid})
    assert statuses == [200], f"valid requests got {statuses}"
    for kind, (_, expected) in bad.items():
        got = {status for status, _, _ in results[kind]}
        assert got <= expected, f"{kind}: expected {expected}, got {got}"
    assert {status for status, _, _ in results["stalled"]} == {408}
    assert [dropped for dropped, _, _ in results["dripping"]] == [1, 1]
    assert max(seconds for _, _, seconds in results["stalled"] + results["dripping"]) < 2 * READ_TIMEOUT
    slowest = max(seconds for _, _, seconds in valid)
    # A stalled client holds only its own connection: no valid request waits for one to be dropped.
    assert slowest < READ_TIMEOUT, f"a valid request took {slowest:.2f} s (load test {took:.1f} s)"
    stalls = [(start, start + seconds) for _, start, seconds in results["stalled"]]
    assert any(a < start and start + seconds < b for _, start, seconds in valid for a, b in stalls)
