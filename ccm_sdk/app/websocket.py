"""The server side of a WebSocket (RFC 6455), from the standard library only.

``ccm serve`` streams frames over it: one connection, messages both ways, no request and
data URL per frame. What it implements: the opening handshake (:func:`handshake_headers`),
masked client frames, fragmented messages, ping/pong, the closing handshake, and limits: a
message larger than ``max_message_bytes`` closes the connection with code 1009, a protocol
error with 1002, text that is not UTF-8 with 1007. Extensions and subprotocols are not offered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import InputError

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED = 1000, 1001, 1002, 1003
CLOSE_INVALID_DATA, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_INTERNAL = 1007, 1008, 1009, 1011
MAX_CONTROL_PAYLOAD = 125


class WebSocketError(InputError):
    """A peer broke the protocol or a limit; ``code`` is the close code the connection ends with."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL_ERROR):
        super().__init__(message)
        self.code = code


class HandshakeError(InputError):
    """An upgrade request that is not a valid WebSocket opening handshake (answered 400 or 426)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode("ascii")


def is_upgrade(headers) -> bool:
    """True when the request asks to switch to WebSocket (``Upgrade: websocket``)."""
    return any(value.strip().lower() == "websocket" for value in (headers.get("Upgrade") or "").split(","))


def handshake_headers(method: str, headers) -> dict[str, str]:
    """The 101 answer's headers for a valid opening handshake; :class:`HandshakeError` otherwise."""
    if method != "GET":
        raise HandshakeError(f"a WebSocket opens with GET, got {method}", 405)
    if not is_upgrade(headers):
        raise HandshakeError("expected 'Upgrade: websocket' (this endpoint speaks WebSocket only)", 426)
    if "upgrade" not in [part.strip().lower() for part in (headers.get("Connection") or "").split(",")]:
        raise HandshakeError(f"expected a Connection header containing 'Upgrade', got {headers.get('Connection')!r}")
    version = headers.get("Sec-WebSocket-Version")
    if version != "13":
        raise HandshakeError(f"expected Sec-WebSocket-Version: 13, got {version!r}", 426)
    key = headers.get("Sec-WebSocket-Key") or ""
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise HandshakeError(f"expected a Sec-WebSocket-Key of 16 bytes in base64, got {key!r}")
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": accept_key(key)}


@dataclass(frozen=True)
class Message:
    """One whole message: ``text`` (str) or binary (bytes) ``data``."""

    data: str | bytes

    @property
    def is_text(self) -> bool:
        return isinstance(self.data, str)


class WebSocket:
    """An open WebSocket on ``sock`` (the handshake done), reading from ``reader``.

    ``reader`` is the buffered input the HTTP request was read from (it may hold the first frames
    already). ``set_deadline(seconds)`` bounds each wait for a message; by default the socket's
    timeout does. :meth:`receive` returns the next text or binary message, answering pings and
    the closing handshake itself, and None once the connection is closed. Sends are thread-safe.
    """

    def __init__(self, sock: socket.socket, reader: BinaryIO, *, max_message_bytes: int,
                 set_deadline: Callable[[float | None], None] | None = None):
        self.sock = sock
        self.reader = reader
        self.max_message_bytes = max_message_bytes
        self._set_deadline = set_deadline or sock.settimeout
        self._send_lock = threading.Lock()
        self.closed = False
        self.close_code: int | None = None

    # --- reading --------------------------------------------------------------------------

    def _read(self, count: int) -> bytes:
        data = self.reader.read(count)
        if data is None or len(data) < count:
            raise ConnectionError(f"the peer closed the connection in the middle of a frame ({len(data or b'')} of {count} bytes)")
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read(2)
        fin, rsv, opcode = bool(first & 0x80), first & 0x70, first & 0x0F
        if rsv:
            raise WebSocketError(f"reserved bits set ({rsv:#x}) without a negotiated extension")
        if not second & 0x80:
            raise WebSocketError("client frames must be masked (RFC 6455, section 5.1)")
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read(8))
        if opcode >= OP_CLOSE and (length > MAX_CONTROL_PAYLOAD or not fin):
            raise WebSocketError(f"control frames carry at most {MAX_CONTROL_PAYLOAD} bytes and are not fragmented")
        if length > self.max_message_bytes:
            raise WebSocketError(f"a message may be at most {self.max_message_bytes} bytes, got a frame of {length}", CLOSE_TOO_BIG)
        mask = self._read(4)
        payload = self._read(length) if length else b""
        if length:
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (length // 4 + 1))[:length], "big")).to_bytes(length, "big")
        return fin, opcode, payload

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next text or binary message, or None when the connection is closed (by either side).

        Raises :class:`TimeoutError` when nothing arrives within ``timeout`` seconds, and closes the
        connection with the matching code on a protocol error or an oversized message.
        """
        parts: list[bytes] = []
        kind: int | None = None
        size = 0
        while not self.closed:
            self._set_deadline(timeout)
            try:
                fin, opcode, payload = self._frame()
            except WebSocketError as exc:
                self.close(exc.code, str(exc)[:100])
                return None
            except TimeoutError:
                raise TimeoutError(f"no message within {timeout} s") from None
            except OSError:  # reset, or closed in the middle of a frame
                self.closed = True
                return None
            if opcode == OP_PING:
                self._send_frame(OP_PONG, payload)
            elif opcode == OP_PONG:
                continue
            elif opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else CLOSE_NORMAL
                self.close_code = code
                self.close(code if code in (CLOSE_NORMAL, CLOSE_GOING_AWAY) else CLOSE_NORMAL)
                return None
            elif opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
                if (opcode == OP_CONTINUATION) != (kind is not None):
                    self.close(CLOSE_PROTOCOL_ERROR, "continuation frame without a message, or a new message inside one")
                    return None
                kind = opcode if kind is None else kind
                size += len(payload)
                if size > self.max_message_bytes:
                    self.close(CLOSE_TOO_BIG, f"a message may be at most {self.max_message_bytes} bytes")
                    return None
                parts.append(payload)
                if fin:
                    data = b"".join(parts)
                    if kind == OP_BINARY:
                        return Message(data)
                    try:
                        return Message(data.decode("utf-8"))
                    except UnicodeDecodeError:
                        self.close(CLOSE_INVALID_DATA, "text messages must be UTF-8")
                        return None
            else:
                self.close(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
                return None
        return None

    # --- writing --------------------------------------------------------------------------

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, length)
        with self._send_lock:
            self.sock.sendall(head + payload)

    def send(self, data: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message; :class:`ConnectionError` once closed."""
        if self.closed:
            raise ConnectionError("the WebSocket is closed")
        if isinstance(data, str):
            self._send_frame(OP_TEXT, data.encode("utf-8"))
        else:
            self._send_frame(OP_BINARY, bytes(data))

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame (once) and mark the connection closed; the caller closes the socket."""
        if self.closed:
            return
        self.closed = True
        self.close_code = self.close_code or code
        try:
            self._send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2])
        except OSError:
            pass
