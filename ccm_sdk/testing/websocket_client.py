"""A minimal WebSocket client (RFC 6455) for tests and benchmarks of ``ccm serve``'s ``/api/stream``.

Standard library only; it masks its frames as a browser does and can send raw frames, so
tests can also break the protocol on purpose.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from urllib.parse import urlsplit

from ..app.websocket import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, accept_key


class WebSocketClient:
    """``WebSocketClient(url, origin=None)``: connect, handshake, then :meth:`send` / :meth:`receive`."""

    def __init__(self, url: str, *, origin: str | None = None, timeout: float = 30.0, headers: dict[str, str] | None = None):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        request = {"Host": f"{parts.hostname}:{parts.port}", "Upgrade": "websocket", "Connection": "Upgrade",
                   "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}
        if origin is not None:
            request["Origin"] = origin
        request.update(headers or {})
        lines = [f"GET {parts.path or '/'} HTTP/1.1", *(f"{k}: {v}" for k, v in request.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buffer = b""
        head = self._read_until(b"\r\n\r\n")
        self.status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(self.status_line.split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines if line)}
        if self.status == 101 and self.headers.get("sec-websocket-accept") != accept_key(key):
            raise ConnectionError(f"the server's Sec-WebSocket-Accept {self.headers.get('sec-websocket-accept')!r} is wrong")
        self.body = b""
        if self.status != 101:  # an HTTP error answer: keep its body for the caller
            length = int(self.headers.get("content-length", "0"))
            self.body = self._read(length)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection during the handshake")
            self._buffer += chunk
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self.sock.recv(max(65536, count - len(self._buffer)))
            if not chunk:
                raise ConnectionError(f"the server closed the connection ({len(self._buffer)} of {count} bytes read)")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> None:
        """One raw frame (tests use ``masked=False``, ``rsv`` or ``fin=False`` to break the protocol)."""
        length = len(payload)
        first = (0x80 if fin else 0) | rsv | opcode
        mask_bit = 0x80 if masked else 0
        if length < 126:
            head = struct.pack("!BB", first, mask_bit | length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", first, mask_bit | 126, length)
        else:
            head = struct.pack("!BBQ", first, mask_bit | 127, length)
        if masked:
            mask = os.urandom(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if length < 4096 else \
                (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (length // 4 + 1))[:length], "big")).to_bytes(length, "big")
            head += mask
        self.sock.sendall(head + payload)

    def send(self, data: str | bytes) -> None:
        self.send_frame(OP_TEXT if isinstance(data, str) else OP_BINARY, data.encode() if isinstance(data, str) else data)

    def receive_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame from the server (unmasked, unfragmented)."""
        first, second = self._read(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read(8))
        return first & 0x0F, self._read(length)

    def receive(self) -> str | bytes | None:
        """The next text (str) or binary (bytes) message; None after a close frame (whose code is kept in ``close_code``)."""
        while True:
            opcode, payload = self.receive_frame()
            if opcode == OP_TEXT:
                return payload.decode()
            if opcode == OP_BINARY:
                return payload
            if opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.close_reason = payload[2:].decode(errors="replace")
                return None
            if opcode == OP_PING:
                continue

    def close(self, code: int = 1000) -> None:
        try:
            self.send_frame(OP_CLOSE, struct.pack("!H", code))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> WebSocketClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
