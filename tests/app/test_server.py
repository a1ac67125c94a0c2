"""``ccm serve``'s HTTP server, run in a thread on a free port with the tiny models."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk.app.server import GenerationService, decode_image, encode_png, make_server, server_url
from ccm_sdk.errors import ImageTooLargeError, InputError
from ccm_sdk.pipeline import CCMPipeline


def _sketch(size: int = 64, mode: str = "RGBA") -> Image.Image:
    array = np.zeros((size, size, 3), dtype=np.uint8)
    lo, hi = size // 4, size - size // 4
    array[lo:hi, lo] = array[lo:hi, hi] = array[lo, lo:hi] = array[hi, lo:hi] = 255  # a square outline
    return Image.fromarray(array).convert(mode)


@pytest.fixture(scope="module")
def server(pipe):
    service = GenerationService(pipe, model="tiny", condition="canny", initial_prompt="a cat", initial_control=_sketch(mode="RGB"))
    server = make_server(service, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(server):
    return server_url(server)


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return answer.status, answer.read(), answer.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


def _post(url: str, payload: dict | bytes) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url + "api/generate", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _image(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_page_and_info(served):
    status, body, content_type = _get(served)
    assert status == 200 and content_type.startswith("text/html")
    page = body.decode()
    assert "<canvas" in page and "/api/generate" in page and "/api/info" in page
    status, body, _ = _get(served + "api/info")
    info = json.loads(body)
    assert status == 200
    assert info["size"] == [64, 64] and info["controlnets"] == 1 and info["control_channels"] == 3
    assert info["prompt"] == "a cat" and info["condition"] == "canny"
    assert _image(info["control"]).tobytes() == _sketch(mode="RGB").tobytes()


def test_generate_matches_the_pipeline(served, pipe):
    sketch = _sketch()  # a canvas sends RGBA; the 3-channel ControlNet gets its colours
    status, answer = _post(served, {"prompt": "a red square", "control": encode_png(sketch), "steps": 2, "seed": 5})
    assert status == 200, answer
    assert answer["nfe"] == 2 and answer["seconds"] > 0
    served_image = np.asarray(_image(answer["image"]).convert("RGB"))
    direct = pipe("a red square", sketch.convert("RGB"), num_inference_steps=2, generator=torch.Generator().manual_seed(5)).images[0]
    np.testing.assert_array_equal(served_image, np.asarray(direct))
    other_seed = _post(served, {"prompt": "a red square", "control": encode_png(sketch), "steps": 2, "seed": 6})[1]
    assert not np.array_equal(np.asarray(_image(other_seed["image"]).convert("RGB")), served_image)


def test_image_is_preprocessed_with_the_condition(served):
    photo = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    status, answer = _post(served, {"prompt": "x", "image": encode_png(photo), "steps": 1})
    assert status == 200, answer
    control = np.asarray(_image(answer["control"]).convert("L"))
    assert set(np.unique(control)) <= {0, 255} and control.max() == 255  # canny edges, not the photo


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"control": "x"}, 400, "prompt: Field required"),
        ({"prompt": "x", "control": "x", "colour": 1}, 400, "colour: Extra inputs are not permitted"),
        ({"prompt": "x", "steps": 0}, 400, "steps: Input should be greater than or equal to 1"),
        ({"prompt": "x"}, 400, "send 'control' (a control map) or 'image'"),
        ({"prompt": "x", "control": "not base64!"}, 400, "control: expected a PNG or JPEG as a data URL or base64"),
        ({"prompt": "x", "control": base64.b64encode(b"plain text").decode()}, 400, "control: expected a PNG or JPEG image, got 10 bytes"),
        ({"prompt": "x", "control": "a", "image": "b"}, 400, "not both"),
        ({"prompt": "x", "control": encode_png(_sketch(50))}, 400, "multiple of the VAE factor"),
        ({"prompt": "x", "steps": 51}, 400, "steps: Input should be less than or equal to 50"),
        ({"prompt": "x", "control": "data:image/png;base64"}, 400, "control: expected a data URL of the form 'data:image/png;base64,<data>'"),
        ({"prompt": "x", "steps": True}, 400, "steps: Input should be a valid integer"),
        ({"prompt": "x", "steps": "4"}, 400, "steps: Input should be a valid integer"),
        ({"prompt": "x", "seed": "7"}, 400, "seed: Input should be a valid integer"),
        ({"prompt": "x", "guidance": "8"}, 400, "guidance: Input should be a valid number"),
        ({"prompt": "x", "control_scale": False}, 400, "control_scale: Input should be a valid number"),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_goes_on(served, payload, status, message):
    code, answer = _post(served, payload)
    assert code == status
    assert message in answer["error"], answer
    code, _ = _post(served, {"prompt": "x", "control": encode_png(_sketch()), "steps": 1})
    assert code == 200


def test_not_json_too_large_and_unknown_paths(server, served):
    code, answer = _post(served, b"{not json")
    assert code == 400 and "Invalid JSON" in answer["error"]
    limit = server.service.max_body_bytes
    request = urllib.request.Request(served + "api/generate", data=b"x", headers={"Content-Length": str(limit + 1), "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 413
    assert f"the body may be at most {limit} bytes, got {limit + 1}" in json.loads(raised.value.read())["error"]
    status, body, _ = _get(served + "secrets.txt")
    assert status == 404 and "no such page" in json.loads(body)["error"]


def test_model_without_controlnet_refuses_a_control_map(lcm_dir):
    service = GenerationService(CCMPipeline.from_pretrained(lcm_dir), model="tiny")
    assert service.info()["controlnets"] == 0 and service.info()["size"] == [64, 64]
    assert service.info()["guidance"] == 8.0  # the model's recommended scale: the page's slider starts there
    from ccm_sdk.app.server import GenerateRequest

    assert _image(service.generate(GenerateRequest(prompt="a dog", steps=1))["image"]).size == (64, 64)
    with pytest.raises(InputError, match="no ControlNet"):
        service.generate(GenerateRequest(prompt="a dog", control=encode_png(_sketch())))


def test_image_without_condition_is_refused(pipe):
    from ccm_sdk.app.server import GenerateRequest

    service = GenerationService(pipe, model="tiny")
    with pytest.raises(InputError, match="needs a condition"):
        service.generate(GenerateRequest(prompt="x", image=encode_png(_sketch())))


@pytest.fixture(scope="module")
def inpaint_pipe(lcm_dir, tmp_path_factory):
    from ccm_sdk.testing.tiny import save_tiny_controlnet

    controlnet = save_tiny_controlnet(tmp_path_factory.mktemp("models") / "cn-inpaint", lcm_dir, conditioning_channels=4)
    return CCMPipeline.from_pretrained(lcm_dir, controlnet=[controlnet])


def _region(size: int = 64) -> Image.Image:
    region = np.zeros((size, size), np.uint8)
    region[10:30, 20:50] = 255
    return Image.fromarray(region)


def test_inpainting_server_takes_a_picture_and_a_mask(inpaint_pipe):
    from ccm_sdk import get_condition
    from ccm_sdk.app.server import GenerateRequest

    photo = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype("uint8"))
    service = GenerationService(inpaint_pipe, model="tiny", condition="mask")
    answer = service.generate(GenerateRequest(prompt="x", image=encode_png(photo), mask=encode_png(_region()), steps=2, seed=3))
    control = _image(answer["control"])
    assert control.mode == "RGBA"
    assert np.array_equal(np.asarray(control.getchannel("A")) > 0, np.asarray(_region()) > 0)
    expected_map = get_condition("mask")(photo, mask=_region(), output_type="pil")[0]
    direct = inpaint_pipe("x", expected_map, num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images[0]
    np.testing.assert_array_equal(np.asarray(_image(answer["image"]).convert("RGB")), np.asarray(direct))
    with pytest.raises(InputError, match="send 'mask'"):
        service.generate(GenerateRequest(prompt="x", image=encode_png(photo)))


def test_inpainting_page_gets_the_picture_and_mask_of_a_ready_map(inpaint_pipe):
    from ccm_sdk import get_condition

    photo = Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype("uint8"))
    ready = get_condition("mask")(photo, mask=_region(), output_type="pil")[0]
    info = GenerationService(inpaint_pipe, model="tiny", initial_control=ready).info()
    assert info["control_channels"] == 4
    assert np.array_equal(np.asarray(_image(info["mask"])), np.asarray(ready.getchannel("A")))
    assert np.array_equal(np.asarray(_image(info["image"])), np.asarray(ready.convert("RGB")))
    given = GenerationService(inpaint_pipe, model="tiny", initial_control=ready, initial_image=photo, initial_mask=_region()).info()
    assert np.array_equal(np.asarray(_image(given["image"])), np.asarray(photo))  # the picture before masking


def test_mask_is_refused_where_it_cannot_apply(served):
    code, answer = _post(served, {"prompt": "x", "control": encode_png(_sketch()), "mask": encode_png(_region())})
    assert code == 400 and "'mask' goes with 'image'" in answer["error"]
    code, answer = _post(served, {"prompt": "x", "image": encode_png(_sketch()), "mask": encode_png(_region())})
    assert code == 400 and "needs an inpainting ControlNet (4 conditioning channels); this server's takes 3" in answer["error"]


def test_decode_image_accepts_data_urls_and_bare_base64():
    png = encode_png(_sketch(mode="RGB"))
    assert decode_image(png, field="c").size == (64, 64)
    assert decode_image(png.split(",", 1)[1], field="c").tobytes() == _sketch(mode="RGB").tobytes()
    from ccm_sdk.app.server import GenerateRequest

    # JSON integers are numbers for the float fields (the page's JSON.stringify writes 1, not 1.0)
    assert GenerateRequest.model_validate_json('{"prompt": "x", "guidance": 8, "control_scale": 1}').guidance == 8.0


def test_page_script_parses(tmp_path):
    import shutil
    import subprocess
    from importlib import resources

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script is not syntax-checked")
    page = resources.files("ccm_sdk.app").joinpath("page.html").read_text()
    script = tmp_path / "page.js"
    script.write_text(page.split("<script>", 1)[1].split("</script>", 1)[0])
    result = subprocess.run([node, "--check", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


PAGE_HARNESS = r"""
// A stand-in DOM for the page's script: canvases record nothing, fetch answers /api/info with
// INFO and records each generate request's keys; the test then draws one stroke and presses
// "keep painting on this". Canvases record which of them drew an image or filled a rectangle.
const served = JSON.parse(process.env.INFO), posted = [], painted = [];
let offscreen = 0;
function context2d(name) {
  return new Proxy({}, { get(target, key) {
    if (key in target) return target[key];
    if (key === "getImageData") return (x, y, w, h) => ({ data: new Uint8ClampedArray(w * h * 4) });
    if (key === "drawImage" || key === "fillRect") return () => painted.push(`${name}.${key}`);
    return () => {};
  } });
}
function element(id) {
  return { id, value: "1", checked: id === "live", style: {}, textContent: "", listeners: {}, add() {}, setPointerCapture() {},
           children: [], appendChild() {}, prepend(child) { this.children.unshift(child); }, removeChild() {},
           addEventListener(event, handler) { this.listeners[event] = handler; }, getContext() { return context2d(id); },
           toDataURL() { return "data:image/png;base64," + id; }, getBoundingClientRect() { return { left: 0, top: 0, width: 64, height: 64 }; } };
}
const elements = {};
global.document = { getElementById: (id) => (elements[id] ||= element(id)),
                    createElement: () => element(["picture", "mask"][offscreen++]),
                    querySelector: () => element("heading") };
global.Image = class { set src(value) { setTimeout(() => this.onload(), 0); } };
global.Option = class {};
global.fetch = async (url, options) => {
  if (url === "/api/info") return { json: async () => served };
  posted.push(Object.keys(JSON.parse(options.body)).sort());
  return { ok: true, json: async () => ({ image: "data:image/png;base64,x", nfe: 4, seconds: 0.1 }) };
};
setTimeout(async () => {
  elements.canvas.listeners.pointerdown({ clientX: 5, clientY: 5, pointerId: 1 });
  elements.canvas.listeners.pointerup({});
  await new Promise((resolve) => setTimeout(resolve, 50));
  const before = painted.length, requests = posted.length;
  elements.keep.onclick();
  await new Promise((resolve) => setTimeout(resolve, 50));
  console.log(JSON.stringify({ posted, upload: elements["upload-label"] ? elements["upload-label"].textContent : null,
                               kept: painted.slice(before), keepShown: elements.keep.style.display !== "none",
                               requestedAfterKeep: posted.length > requests, status: elements.status.textContent }));
}, 50);
"""


@pytest.mark.parametrize("channels", [3, 4])
def test_page_sends_a_control_map_or_a_picture_and_its_mask(tmp_path, channels):
    import shutil
    import subprocess
    from importlib import resources

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script is not run")
    page = resources.files("ccm_sdk.app").joinpath("page.html").read_text()
    script = tmp_path / "page.js"
    script.write_text(PAGE_HARNESS + page.split("<script>", 1)[1].split("</script>", 1)[0].replace('"use strict";', ""))
    info = {"model": "m", "controlnets": 1, "control_channels": channels, "condition": None, "size": [64, 64], "steps": 4,
            "prompt": "a cat", "control": None, "image": None, "mask": None}
    result = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=60, env={"INFO": json.dumps(info)})
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    sent = {"control_scale", "guidance", "prompt", "seed", "steps"} | ({"image", "mask"} if channels == 4 else {"control"})
    assert run["posted"] and all(set(keys) == sent for keys in run["posted"])
    assert (run["upload"] == "load a picture") == (channels == 4)
    # "keep painting on this": inpainting only; the result becomes the picture and the mask is cleared
    assert run["keepShown"] == (channels == 4)
    assert not run["requestedAfterKeep"]
    if channels == 4:
        assert "picture.drawImage" in run["kept"] and "mask.fillRect" in run["kept"]
        assert "next region" in run["status"]
    else:
        assert run["kept"] == []


# --- hardening: sizes, bombs, timeouts, Host and Origin, the queue, connections -----------------


def _http(server, method: str = "POST", path: str = "/api/generate", body: bytes | dict = b"", *, headers: dict | None = None) -> bytes:
    """A request as raw bytes, with this server's Host, JSON and the body's length unless ``headers`` overrides them."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    fields = {"Host": f"127.0.0.1:{server.server_address[1]}", "Content-Type": "application/json", "Content-Length": str(len(body))}
    fields.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None) + "\r\n"
    return head.encode("latin-1") + body


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Reads to the end (the server closes after each answer): status, headers (lower-case names), JSON body."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body) if body else {}


def _raw(server, data: bytes, *, timeout: float = 30.0) -> tuple[int, dict[str, str], dict]:
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        return _answer(sock)


def _valid(steps: int = 1) -> dict:
    return {"prompt": "x", "control": encode_png(_sketch()), "steps": steps}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` with a few compressed rows: what a decompression bomb's header looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + width) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def test_images_over_the_size_limit_are_refused_with_the_limit(server):
    big = Image.new("RGB", (1024, 1024))  # a few KB as PNG; generated at full size it took minutes
    for field in ("control", "image"):
        status, _, answer = _raw(server, _http(server, body={"prompt": "x", field: encode_png(big), "steps": 1}))
        assert status == 413, answer
        assert answer["type"] == "ImageTooLargeError"
        assert f"{field}: the image is 1024x1024 pixels; this server takes images of at most 64x64 pixels" in answer["error"]
        assert "--max-size" in answer["error"]
    assert _raw(server, _http(server, body=_valid()))[0] == 200


def test_max_size_raises_the_limit_and_the_output_follows(pipe, serve):
    service = GenerationService(pipe, model="tiny", max_size=128)
    assert service.info()["max_size"] == 128 and service.max_body_bytes > GenerationService(pipe, model="tiny").max_body_bytes
    with serve(service) as server:
        status, _, answer = _raw(server, _http(server, body={"prompt": "x", "control": encode_png(_sketch(128)), "steps": 1}))
        assert status == 200, answer
        assert _image(answer["image"]).size == (128, 128)
        status, _, answer = _raw(server, _http(server, body={"prompt": "x", "control": encode_png(_sketch(136)), "steps": 1}))
        assert status == 413 and "is 136x136 pixels; this server takes images of at most 128x128" in answer["error"]
    with pytest.raises(InputError, match="max_size: expected pixels a side from the drawing size 64 to 4096, got 32"):
        GenerationService(pipe, model="tiny", max_size=32)
    with pytest.raises(InputError, match="got 5000"):
        GenerationService(pipe, model="tiny", max_size=5000)
    assert GenerationService(pipe, model="tiny", initial_control=_sketch(96, "RGB")).max_size == 96  # the drawing size when larger


def test_decompression_bombs_are_refused_from_the_header(server):
    bomb = _png_header_only(30000, 30000)
    assert len(bomb) < 200_000
    started = time.monotonic()
    status, _, answer = _raw(server, _http(server, body={"prompt": "x", "control": _data_url(bomb), "steps": 1}))
    assert status == 413 and answer["type"] == "ImageTooLargeError", answer
    assert time.monotonic() - started < 10  # refused from the header: 900 megapixels are never decoded
    # without a server's limit, PIL's bomb error and its warning (above 89 megapixels) are refusals too
    with pytest.raises(ImageTooLargeError, match="image: the image is too large to decode"):
        decode_image(_data_url(bomb), field="image")
    with pytest.raises(ImageTooLargeError, match="too large to decode"):
        decode_image(_data_url(_png_header_only(10000, 10000)), field="image")
    with pytest.raises(ImageTooLargeError, match="is 640x640 pixels"):
        decode_image(_data_url(_png_header_only(640, 640)), field="image", max_side=512)


def test_only_png_and_jpeg_are_decoded():
    buffer = io.BytesIO()
    _sketch(mode="RGB").save(buffer, format="BMP")
    with pytest.raises(InputError, match="control: expected a PNG or JPEG image"):
        decode_image(_data_url(buffer.getvalue()), field="control")
    buffer = io.BytesIO()
    _sketch(mode="RGB").save(buffer, format="JPEG")
    assert decode_image(_data_url(buffer.getvalue()), field="control").size == (64, 64)


def test_a_stalled_client_gets_408_and_blocks_no_one(pipe, serve):
    with serve(GenerationService(pipe, model="tiny"), read_timeout=0.5) as server:
        stalled = socket.create_connection(server.server_address[:2], timeout=30)
        try:
            stalled.sendall(_http(server, body=b"x" * 1000)[:-990])  # announces 1000 bytes, sends 10
            # while it stalls, others are served
            assert _raw(server, _http(server, body=_valid()))[0] == 200
            status, _, answer = _answer(stalled)
        finally:
            stalled.close()
        assert status == 408 and answer["type"] == "RequestTimeout"
        assert "expected a body of 1000 bytes within the server's read timeout of 0.5 s" in answer["error"]


def test_a_client_that_drips_its_headers_is_dropped_at_the_deadline(pipe, serve):
    with serve(GenerationService(pipe, model="tiny"), read_timeout=0.5) as server:
        started = time.monotonic()
        with socket.create_connection(server.server_address[:2], timeout=0.1) as sock:
            sock.sendall(b"GET /api/info HTTP/1.1\r\n")
            dropped = False
            while not dropped and time.monotonic() - started < 5:
                try:
                    sock.sendall(b"X")  # one byte of a header line every 0.1 s: each read is quick, the request never ends
                    dropped = sock.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:
                    dropped = True
        assert dropped and time.monotonic() - started < 3


def test_http_level_errors_are_json_too(server):
    status, _, answer = _raw(server, b"GET /api/info HTTP/9\r\n\r\n")
    assert status == 400 and answer["error"].startswith("Bad request version ('HTTP/9')") and answer["type"] == "BadRequest"
    status, _, answer = _raw(server, _http(server, "PUT"))
    assert status == 501 and answer["error"].startswith("Unsupported method ('PUT')") and answer["type"] == "NotImplemented"
    status, _, answer = _raw(server, _http(server, "GET", "/api/info", headers={f"X-{i}": "y" for i in range(120)}))
    assert status == 431 and "Too many headers" in answer["error"]


def test_incomplete_and_chunked_bodies(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(_http(server, body=b"x" * 100)[:-90])
        sock.shutdown(socket.SHUT_WR)
        status, _, answer = _answer(sock)
    assert status == 400 and "expected a body of 100 bytes (Content-Length), got 10" in answer["error"]
    chunked = _http(server, body=b"", headers={"Content-Length": None, "Transfer-Encoding": "chunked"}) + b"2\r\n{}\r\n0\r\n\r\n"
    status, _, answer = _raw(server, chunked)
    assert status == 411 and "expected a Content-Length header" in answer["error"]
    superscript = _http(server, body=b"", headers={"Content-Length": "\u00b2"})  # str.isdigit() says yes, int() says no
    assert _raw(server, superscript)[0] == 411
    two_lengths = _http(server, body=b"{}").replace(b"\r\n\r\n", b"\r\nContent-Length: 500\r\n\r\n")
    status, _, answer = _raw(server, two_lengths)
    assert status == 400 and answer == {"error": "expected one Content-Length header, got 2", "type": "BadContentLength"}


def test_host_origin_and_content_type_are_checked(server):
    port = server.server_address[1]
    status, _, answer = _raw(server, _http(server, "GET", "/api/info", headers={"Host": f"evil.example:{port}"}))
    assert status == 403 and answer["type"] == "ForbiddenHost"  # DNS rebinding cannot read /api/info
    assert f"127.0.0.1:{port}" in answer["error"] and "got 'evil.example:" in answer["error"] and "--allow-host" in answer["error"]
    for host in (f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert _raw(server, _http(server, "GET", "/api/info", headers={"Host": host}))[0] == 200, host
    for host in (f"127.0.0.1:{port + 1}", "127.0.0.1", "127.0.0.1:x", ""):
        assert _raw(server, _http(server, "GET", "/api/info", headers={"Host": host}))[0] == 403, host
    assert _raw(server, b"GET /api/info HTTP/1.0\r\n\r\n")[0] == 403  # no Host at all
    two_hosts = _http(server, "GET", "/api/info").replace(b"\r\n\r\n", f"\r\nHost: evil.example:{port}\r\n\r\n".encode())
    status, _, answer = _raw(server, two_hosts)
    assert status == 403 and "got 2 Host headers" in answer["error"]

    status, headers, answer = _raw(server, _http(server, body=_valid(), headers={"Origin": "http://evil.example"}))
    assert status == 403 and answer["type"] == "ForbiddenOrigin" and "--allow-origin" in answer["error"]
    assert "access-control-allow-origin" not in headers
    assert _raw(server, _http(server, body=_valid(), headers={"Origin": "null"}))[0] == 403
    assert _raw(server, _http(server, body=_valid(), headers={"Origin": f"http://127.0.0.1:{port}"}))[0] == 200  # the page's own
    two_origins = _http(server, body=_valid(), headers={"Origin": f"http://127.0.0.1:{port}"}).replace(
        b"\r\n\r\n", b"\r\nOrigin: http://evil.example\r\n\r\n", 1)
    status, _, answer = _raw(server, two_origins)
    assert status == 403 and answer == {"error": "expected at most one Origin header, got 2", "type": "ForbiddenOrigin"}

    # a cross-site form or fetch without preflight can only send text/plain, form or multipart bodies
    status, _, answer = _raw(server, _http(server, body=_valid(), headers={"Content-Type": "text/plain"}))
    assert status == 415 and answer["error"] == "expected Content-Type: application/json, got 'text/plain'"
    status, _, answer = _raw(server, _http(server, body=_valid(), headers={"Content-Type": None}))
    assert status == 415 and answer["error"] == "expected Content-Type: application/json, got none"
    assert _raw(server, _http(server, body=_valid(), headers={"Content-Type": "application/json; charset=utf-8"}))[0] == 200


def test_allow_host_and_allow_origin_open_it_on_purpose(pipe, serve):
    options = {"allow_hosts": ["MyBox.lan"], "allow_origins": ["https://app.example"]}
    with serve(GenerationService(pipe, model="tiny"), **options) as server:
        for host in ("mybox.lan", "mybox.lan:443", f"mybox.lan:{server.server_address[1]}"):
            assert _raw(server, _http(server, "GET", "/api/info", headers={"Host": host}))[0] == 200, host
        assert _raw(server, _http(server, "GET", "/api/info", headers={"Host": "other.lan"}))[0] == 403
        status, headers, _ = _raw(server, _http(server, body=_valid(), headers={"Origin": "https://app.example"}))
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        preflight = _http(server, "OPTIONS", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "content-type"})
        status, headers, _ = _raw(server, preflight)
        assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in headers["access-control-allow-methods"] and headers["access-control-allow-headers"] == "Content-Type"
        assert _raw(server, _http(server, body=_valid(), headers={"Origin": "https://other.example"}))[0] == 403
    service = GenerationService(pipe, model="tiny")
    with pytest.raises(InputError, match="--allow-origin: expected an origin such as https://app.example"):
        make_server(service, port=0, allow_origins=["app.example/path"])
    with pytest.raises(InputError, match="--allow-host: expected a host name or address without a scheme or port"):
        make_server(service, port=0, allow_hosts=["http://mybox.lan"])
    with pytest.raises(InputError, match="read_timeout: expected seconds"):
        make_server(service, port=0, read_timeout=0)


class _GatedPipe:
    """The pipeline, but each call first says it started and then waits for ``gate``."""

    def __init__(self, pipe):
        self._pipe, self.started, self.gate = pipe, threading.Semaphore(0), threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self.started.release()
        assert self.gate.wait(30)
        return self._pipe(*args, **kwargs)


def test_a_full_queue_answers_503_at_once_and_the_waiting_go_in_order(pipe, serve):
    gated = _GatedPipe(pipe)
    service = GenerationService(gated, model="tiny", max_queue=1)
    with serve(service) as server:
        answers: dict[int, dict] = {}

        def send(seed):
            answers[seed] = _raw(server, _http(server, body={"prompt": "x", "control": encode_png(_sketch()), "steps": 1, "seed": seed}))

        first = threading.Thread(target=send, args=(1,))
        first.start()
        assert gated.started.acquire(timeout=30)  # generating, holding the worker
        second = threading.Thread(target=send, args=(2,))
        second.start()
        deadline = time.monotonic() + 30
        while service._queue.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        status, headers, answer = _raw(server, _http(server, body=_valid()))
        assert time.monotonic() - started < 10  # answered while the worker is still held, not after
        assert status == 503 and headers["retry-after"] == "1" and answer["type"] == "ServerBusyError"
        assert "the server is busy: 1 request(s) already wait" in answer["error"]
        assert _raw(server, _http(server, body={"prompt": "x", "steps": 0}))[0] == 400  # bad requests still get their 4xx
        gated.gate.set()
        first.join(30)
        second.join(30)
        assert answers[1][0] == answers[2][0] == 200


def test_connections_beyond_the_limit_get_503_and_slots_come_back(pipe, serve):
    with serve(GenerationService(pipe, model="tiny"), max_connections=2, read_timeout=30) as server:
        idle = [socket.create_connection(server.server_address[:2], timeout=30) for _ in range(2)]
        try:
            time.sleep(0.2)  # both accepted and handed to their threads
            status, _, answer = _raw(server, _http(server, "GET", "/api/info"))
            assert status == 503 and "2 connections are open already" in answer["error"]
        finally:
            for sock in idle:
                sock.close()
        deadline, status = time.monotonic() + 10, 503
        while status == 503 and time.monotonic() < deadline:
            status = _raw(server, _http(server, "GET", "/api/info"))[0]
        assert status == 200


def test_listens_on_loopback_by_default(pipe):
    server = make_server(GenerationService(pipe, model="tiny"), port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert server_url(server) == f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.server_close()


def test_a_port_or_host_it_cannot_listen_on_is_an_input_error(pipe):
    service = GenerationService(pipe, model="tiny")
    for port in (-1, 65536, True):
        with pytest.raises(InputError, match=r"port: expected 0 \(any free one\) to 65535, got"):
            make_server(service, port=port)
    with pytest.raises(InputError, match=r"cannot listen on 999.1.1.1:0: "):
        make_server(service, host="999.1.1.1", port=0)
    taken = make_server(service, port=0)
    try:
        with pytest.raises(InputError, match=rf"cannot listen on 127.0.0.1:{taken.server_address[1]}: Address already in use"):
            make_server(service, port=taken.server_address[1])
    finally:
        taken.server_close()
