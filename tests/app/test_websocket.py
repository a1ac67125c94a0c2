"""The stdlib WebSocket server side, over loopback: handshake, frames, fragments, ping, close codes and limits."""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading

import pytest

from ccm_sdk.app.websocket import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    HandshakeError,
    WebSocket,
    accept_key,
    handshake_headers,
)
from ccm_sdk.testing.websocket_client import WebSocketClient

LIMIT = 100_000


def test_accept_key_matches_the_rfc_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455, section 1.3


def _headers(**values) -> http.client.HTTPMessage:
    message = http.client.HTTPMessage()
    for name, value in values.items():
        message[name.replace("_", "-")] = value
    return message


GOOD = {"Upgrade": "websocket", "Connection": "keep-alive, Upgrade", "Sec_WebSocket_Version": "13",
        "Sec_WebSocket_Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_handshake_headers():
    assert handshake_headers("GET", _headers(**GOOD))["Sec-WebSocket-Accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(("method", "change", "status", "match"), [
    ("POST", {}, 405, "opens with GET, got POST"),
    ("GET", {"Upgrade": "h2c"}, 426, "expected 'Upgrade: websocket'"),
    ("GET", {"Connection": "keep-alive"}, 400, "Connection header containing 'Upgrade', got 'keep-alive'"),
    ("GET", {"Sec_WebSocket_Version": "8"}, 426, "Sec-WebSocket-Version: 13, got '8'"),
    ("GET", {"Sec_WebSocket_Key": "c2hvcnQ="}, 400, "Sec-WebSocket-Key of 16 bytes in base64, got 'c2hvcnQ='"),
    ("GET", {"Sec_WebSocket_Key": "not base64!"}, 400, "16 bytes in base64"),
])  # fmt: skip
def test_bad_handshakes_are_refused(method, change, status, match):
    with pytest.raises(HandshakeError, match=match) as caught:
        handshake_headers(method, _headers(**{**GOOD, **change}))
    assert caught.value.status == status


@contextlib.contextmanager
def echo_server(timeout: float | None = 10.0):
    """A loopback server that echoes each message back (text upper-cased), and records how it ended."""
    listener = socket.create_server(("127.0.0.1", 0))
    ended: dict = {}

    def serve():
        conn, _ = listener.accept()
        reader = conn.makefile("rb")
        reader.readline()
        headers = http.client.parse_headers(reader)
        answer = handshake_headers("GET", headers)
        conn.sendall(("HTTP/1.1 101 Switching Protocols\r\n" + "".join(f"{k}: {v}\r\n" for k, v in answer.items()) + "\r\n").encode())
        ws = WebSocket(conn, reader, max_message_bytes=LIMIT)
        try:
            while (message := ws.receive(timeout=timeout)) is not None:
                ws.send(message.data.upper() if message.is_text else message.data)
        except TimeoutError as exc:
            ended["timeout"] = str(exc)
        ended["code"] = ws.close_code
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"ws://127.0.0.1:{listener.getsockname()[1]}/", ended
    finally:
        thread.join(10)
        listener.close()


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, LIMIT])
def test_messages_of_every_length_form_round_trip(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    with echo_server() as (url, _), WebSocketClient(url) as client:
        assert client.status == 101
        client.send(payload)
        assert client.receive() == payload
        client.send("héllo")
        assert client.receive() == "HÉLLO"


def test_fragments_join_and_pings_are_answered_between_them():
    with echo_server() as (url, ended):
        client = WebSocketClient(url)
        client.send_frame(OP_TEXT, b"frag", fin=False)
        client.send_frame(OP_PING, b"are you there")
        client.send_frame(OP_CONTINUATION, b"mented", fin=False)
        client.send_frame(OP_CONTINUATION, b"!", fin=True)
        assert client.receive_frame() == (OP_PONG, b"are you there")
        assert client.receive() == "FRAGMENTED!"
        client.close(1000)
    assert ended["code"] == 1000


@pytest.mark.parametrize(("send", "code"), [
    (lambda c: c.send_frame(OP_TEXT, b"hi", masked=False), 1002),  # client frames must be masked
    (lambda c: c.send_frame(OP_TEXT, b"hi", rsv=0x40), 1002),  # no extension negotiated
    (lambda c: c.send_frame(0x3, b"hi"), 1002),  # an unknown opcode
    (lambda c: c.send_frame(OP_CONTINUATION, b"hi"), 1002),  # a continuation of nothing
    (lambda c: c.send_frame(OP_PING, b"x" * 126), 1002),  # control frames carry at most 125 bytes
    (lambda c: c.send_frame(OP_TEXT, b"\xff\xfe"), 1007),  # text that is not UTF-8
    (lambda c: c.send_frame(OP_BINARY, bytes(LIMIT + 1)), 1009),  # one frame over the limit
    (lambda c: (c.send_frame(OP_BINARY, bytes(LIMIT // 2 + 1), fin=False),
                c.send_frame(OP_CONTINUATION, bytes(LIMIT // 2 + 1))), 1009),  # a message over the limit in fragments
])  # fmt: skip
def test_protocol_errors_and_limits_close_with_their_code(send, code):
    with echo_server() as (url, ended):
        client = WebSocketClient(url)
        send(client)
        assert client.receive() is None and client.close_code == code
        client.sock.close()
    assert ended["code"] == code


def test_a_silent_client_times_out():
    with echo_server(timeout=0.2) as (url, ended):
        client = WebSocketClient(url)
        client.sock.settimeout(5)
        assert client.sock.recv(1) == b""  # the server gave up and closed
        client.sock.close()
    assert "no message within 0.2 s" in ended["timeout"]


def test_the_peer_going_away_mid_frame_ends_the_receive():
    with echo_server() as (url, ended):
        client = WebSocketClient(url)
        client.sock.sendall(struct.pack("!BB", 0x82, 0x80 | 10) + b"mask" + b"abc")  # 3 of 10 bytes
        client.sock.close()
    assert ended["code"] is None  # closed without a close frame: no code
