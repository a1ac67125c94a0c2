"""``ccm serve``'s HTTP server, run in a thread on a free port with the tiny models."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk.app.server import MAX_BODY_BYTES, GenerationService, decode_image, encode_png, make_server, server_url
from ccm_sdk.errors import InputError
from ccm_sdk.pipeline import CCMPipeline


def _sketch(size: int = 64, mode: str = "RGBA") -> Image.Image:
    array = np.zeros((size, size, 3), dtype=np.uint8)
    lo, hi = size // 4, size - size // 4
    array[lo:hi, lo] = array[lo:hi, hi] = array[lo, lo:hi] = array[hi, lo:hi] = 255  # a square outline
    return Image.fromarray(array).convert(mode)


@pytest.fixture(scope="module")
def pipe(lcm_dir, controlnet_dir):
    return CCMPipeline.from_pretrained(lcm_dir, controlnet=[controlnet_dir])


@pytest.fixture(scope="module")
def served(pipe):
    service = GenerationService(pipe, model="tiny", condition="canny", initial_prompt="a cat", initial_control=_sketch(mode="RGB"))
    server = make_server(service, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server_url(server)
    server.shutdown()
    server.server_close()


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
        ({"prompt": "x", "control": encode_png(_sketch(50))}, 400, "multiples of the VAE factor"),
        ({"prompt": "x", "steps": 51}, 400, "steps: Input should be less than or equal to 50"),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_goes_on(served, payload, status, message):
    code, answer = _post(served, payload)
    assert code == status
    assert message in answer["error"], answer
    code, _ = _post(served, {"prompt": "x", "control": encode_png(_sketch()), "steps": 1})
    assert code == 200


def test_not_json_too_large_and_unknown_paths(served):
    code, answer = _post(served, b"{not json")
    assert code == 400 and "Invalid JSON" in answer["error"]
    request = urllib.request.Request(served + "api/generate", data=b"x", headers={"Content-Length": str(MAX_BODY_BYTES + 1)})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 413
    status, body, _ = _get(served + "secrets.txt")
    assert status == 404 and "no such page" in json.loads(body)["error"]


def test_model_without_controlnet_refuses_a_control_map(lcm_dir):
    service = GenerationService(CCMPipeline.from_pretrained(lcm_dir), model="tiny")
    assert service.info()["controlnets"] == 0 and service.info()["size"] == [64, 64]
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
    sent = {"control_scale", "prompt", "seed", "steps"} | ({"image", "mask"} if channels == 4 else {"control"})
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
