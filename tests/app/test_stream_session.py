"""``/api/stream`` over loopback: settings, frames and answers, the filter, stale frames, errors and the access checks."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk.app.server import GenerationService
from ccm_sdk.app.stream_session import pack, unpack
from ccm_sdk.errors import InputError
from ccm_sdk.testing.websocket_client import WebSocketClient


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _frame(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture()
def service(pipe):
    service = GenerationService(pipe, model="tiny")
    yield service
    service.close()


def _connect(server, **kwargs) -> WebSocketClient:
    return WebSocketClient(f"ws://127.0.0.1:{server.server_address[1]}/api/stream", **kwargs)


def _start(client: WebSocketClient, **settings) -> dict:
    client.send(json.dumps({"type": "start", "prompt": "a red square", **settings}))
    answer = json.loads(client.receive())
    assert answer["type"] == "ready", answer
    return answer


def _answer(client: WebSocketClient) -> tuple[dict, bytes]:
    message = client.receive()
    assert isinstance(message, bytes), message
    return unpack(message)


def test_frames_come_back_as_the_pipeline_makes_them(serve, service, pipe):
    frame = _frame(1)
    with serve(service) as server, _connect(server) as client:
        ready = _start(client, steps=2, seed=5)
        assert ready["size"] == [64, 64] and ready["threshold"] == 0.004
        client.send(pack({"id": 7}, _png(frame)))
        header, png = _answer(client)
        assert header["id"] == 7 and header["nfe"] == 2 and not header["skipped"] and header["seed"] == 5
        assert header["server_ms"] >= header["seconds"] * 1000 * 0.5 and header["generated"] == 1
        image = np.asarray(Image.open(io.BytesIO(png)))
        expected = pipe("a red square", frame, num_inference_steps=2, generator=torch.Generator().manual_seed(5)).images[0]
        assert np.array_equal(image, np.asarray(expected))
        # the same frame again: skipped by the filter, no image sent (the last one stands)
        client.send(pack({"id": 8}, _png(frame)))
        header, png = _answer(client)
        assert header["id"] == 8 and header["skipped"] and header["nfe"] == 0 and png == b"" and header["skipped_total"] == 1


def test_new_settings_take_effect_at_the_next_frame(serve, service):
    frame = _png(_frame(2))
    with serve(service) as server, _connect(server) as client:
        _start(client, steps=1)
        client.send(pack({"id": 1}, frame))
        first = _answer(client)[1]
        _start(client, steps=1, prompt="a blue circle", threshold=None)
        for i in (2, 3):  # the filter is off: both generate
            client.send(pack({"id": i}, frame))
            header, png = _answer(client)
            assert not header["skipped"] and png != first


def test_a_server_side_condition_turns_pictures_into_control_maps(serve, service):
    photo = Image.new("RGB", (64, 64), (20, 20, 20))
    photo.paste((230, 230, 230), (16, 16, 48, 48))
    with serve(service) as server, _connect(server) as client:
        _start(client, steps=1, condition="canny")
        client.send(pack({"id": 1}, _png(photo)))
        header, png = _answer(client)
        assert header["nfe"] == 1 and Image.open(io.BytesIO(png)).size == (64, 64)
        _start(client, steps=1, condition="sketch", img2img=True, strength=0.5)
        client.send(pack({"id": 2}, _png(photo)))
        assert _answer(client)[0]["nfe"] == 1  # img2img at strength 0.5 keeps the step count (LCM)


def test_stale_frames_are_dropped_and_reported(serve, service):
    release = threading.Event()
    with serve(service) as server, _connect(server) as client:
        _start(client, steps=1)
        blocker = threading.Thread(target=service.run, args=(release.wait, 30), daemon=True)
        blocker.start()  # the model is busy: frame 1 waits for its turn, frames 2-4 arrive meanwhile
        client.send(pack({"id": 1}, _png(_frame(1))))
        deadline = time.monotonic() + 10
        while service._queue.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in (2, 3, 4):
            client.send(pack({"id": i}, _png(_frame(i))))
        assert [_answer(client)[0] for _ in range(2)] == [{"id": 2, "dropped": True, "dropped_total": 1},
                                                         {"id": 3, "dropped": True, "dropped_total": 2}]
        release.set()
        answers = [_answer(client)[0] for _ in range(2)]
        assert [a["id"] for a in answers] == [1, 4] and answers[1]["dropped_total"] == 2 and "dropped" not in answers[1]
        blocker.join(10)


@pytest.mark.parametrize(("message", "match"), [
    (json.dumps({"type": "start", "prompt": "x", "steps": 0}), "steps: Input should be greater than or equal to 1"),
    (json.dumps({"type": "start", "prompt": "x", "condition": "hed"}), "condition: expected null or one of canny, sketch, got 'hed'"),
    (json.dumps({"type": "start", "prompt": "x", "img2img": True}), "img2img needs a condition"),
    (json.dumps({"type": "start", "prompt": "x", "colour": 1}), "colour: Extra inputs are not permitted"),
    (json.dumps({"type": "stop"}), "expected a text message of type 'start'"),
    ("not json", "text messages must be JSON"),
    (pack({"id": 1}, b""), "send the 'start' message .* before frames"),
])  # fmt: skip
def test_bad_messages_get_an_error_and_the_stream_goes_on(serve, service, message, match):
    with serve(service) as server, _connect(server) as client:
        client.send(message)
        error = json.loads(client.receive())
        assert error["type"] == "error" and __import__("re").search(match, error["error"]), error
        _start(client, steps=1)  # still open and working
        client.send(pack({"id": 1}, _png(_frame(1))))
        assert _answer(client)[0]["id"] == 1


@pytest.mark.parametrize(("frame", "kind", "match"), [
    (b"\x00\x00", "InputError", "starts with a 4-byte header length, got 2 bytes"),
    (b"\x00\x00\x10\x00{}", "InputError", "header may be at most 1024 bytes"),
    (pack({"no": "id"}), "InputError", "integer 'id'"),
    (pack({"id": 1}, b"not an image"), "InputError", "frame 1"),
    (pack({"id": 1}, _png(_frame(1, size=128))), "ImageTooLargeError", "at most 64x64 pixels"),
])  # fmt: skip
def test_bad_frames_are_refused_one_by_one(serve, service, frame, kind, match):
    with serve(service) as server, _connect(server) as client:
        _start(client, steps=1)
        client.send(frame)
        error = json.loads(client.receive())
        assert error["kind"] == kind and match in error["error"], error


def test_a_message_over_the_size_cap_closes_the_stream(serve, service):
    with serve(service) as server, _connect(server) as client:
        client.send(bytes(service.max_body_bytes + 1))
        assert client.receive() is None and client.close_code == 1009


def test_the_stream_has_the_http_api_access_checks(serve, service):
    with serve(service) as server:
        port = server.server_address[1]
        foreign = _connect(server, origin="http://evil.example")
        assert foreign.status == 403 and json.loads(foreign.body)["type"] == "ForbiddenOrigin"
        rebound = _connect(server, headers={"Host": f"evil.example:{port}"})
        assert rebound.status == 403 and json.loads(rebound.body)["type"] == "ForbiddenHost"
        with _connect(server, origin=f"http://127.0.0.1:{port}") as own:
            assert own.status == 101
            _start(own, steps=1)
        with serve(service, allow_origins=["http://app.example"]) as opened:
            with _connect(opened, origin="http://app.example") as allowed:
                assert allowed.status == 101


def test_plain_http_to_the_stream_endpoint_is_told_to_upgrade(serve, service):
    import urllib.error
    import urllib.request

    with serve(service) as server:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/api/stream", timeout=10)
        assert caught.value.code == 426 and "Upgrade: websocket" in json.loads(caught.value.read())["error"]


def test_unpack_checks_the_header():
    assert unpack(pack({"id": 3, "t": 1.5}, b"png")) == ({"id": 3, "t": 1.5}, b"png")
    with pytest.raises(InputError, match="must be JSON"):
        unpack(b"\x00\x00\x00\x02{x")
