"""A condition whose control map breaks the Condition interface (NaN, inf, wrong rank, dtype, type,
channels, batch, range) gets a ConditionOutputError naming it and its plugin: through the API, the
pipeline and ``ccm preprocess`` (one line, exit 2, no image written)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

import ccm_sdk
from ccm_sdk import plugins
from ccm_sdk.cli import main
from ccm_sdk.errors import ConditionOutputError, PluginError
from ccm_sdk.interfaces import Condition, check_control_map

PLUGIN = "bad-output-plugin"


def _map(images, fill=0.5, channels=3):
    return torch.full((images.shape[0], channels, *images.shape[-2:]), fill)


BAD_OUTPUTS = [
    # (case, what preprocess returns for an RGB batch, expected vs got in the message)
    ("nan", lambda x: _map(x, float("nan")), r"expected finite values in \[0, 1\], got 768 NaN and 0 infinite value\(s\) of 768"),
    ("one-nan", lambda x: _map(x).index_put_((torch.tensor([0]),) * 4, torch.tensor(float("nan"))), r"got 1 NaN and 0 infinite"),
    ("inf", lambda x: _map(x, float("inf")), r"got 0 NaN and 768 infinite value\(s\)"),
    ("minus-inf", lambda x: _map(x, float("-inf")), r"got 0 NaN and 768 infinite value\(s\)"),
    ("3-d", lambda x: _map(x)[0], r"expected a 4-d tensor \[B, 3, H, W\], got 3-d shape \(3, 16, 16\)"),
    ("5-d", lambda x: _map(x)[None], r"expected a 4-d tensor \[B, 3, H, W\], got 5-d shape \(1, 1, 3, 16, 16\)"),
    ("uint8", lambda x: (_map(x) * 255).to(torch.uint8), r"expected a floating-point tensor, got dtype torch.uint8"),
    ("bool", lambda x: _map(x) > 0, r"expected a floating-point tensor, got dtype torch.bool"),
    ("numpy", lambda x: _map(x).numpy(), r"expected a torch.Tensor, got numpy.ndarray"),
    ("pil", lambda x: Image.new("RGB", (16, 16)), r"expected a torch.Tensor, got PIL.Image.Image"),
    ("none", lambda x: None, r"expected a torch.Tensor, got builtins.NoneType"),
    ("channels", lambda x: _map(x, channels=1), r"expected 3 channel\(s\) \[B, 3, H, W\], got shape \(1, 1, 16, 16\)"),
    ("batch", lambda x: torch.cat([_map(x), _map(x)]), r"expected one map per input image \(1\), got 2"),
    ("empty", lambda x: _map(x)[..., :0], r"expected a map of at least 1x1 pixels, got shape \(1, 3, 16, 0\)"),
    ("0-255", lambda x: _map(x, 255.0), r"expected values in \[0, 1\], got values in \[255, 255\]"),
    ("negative", lambda x: _map(x, -0.5), r"expected values in \[0, 1\], got values in \[-0.5, -0.5\]"),
]  # fmt: skip


def _condition_class(output):
    class BadCondition(Condition):
        name = "test-bad-output"
        description = "returns a broken control map"

        def preprocess(self, images, **kwargs):
            return output(images)

    return BadCondition


class registered:
    """A throw-away plugin holding one condition, for the duration of a with-block."""

    def __init__(self, condition_cls):
        self.module = types.ModuleType("bad_output")
        self.module.register_conditions = ccm_sdk.hookimpl(lambda register: register(condition_cls))

    def __enter__(self):
        plugins.load_plugins()
        plugins.pm.register(self.module, name=PLUGIN)

    def __exit__(self, *exc):
        plugins.pm.unregister(name=PLUGIN)
        plugins._failures.pop(PLUGIN, None)


@pytest.mark.parametrize("case, output, message", BAD_OUTPUTS, ids=[c[0] for c in BAD_OUTPUTS])
def test_the_api_names_the_condition_and_its_plugin(case, output, message):
    with registered(_condition_class(output)):
        condition = ccm_sdk.get_condition("test-bad-output")
        for call in (condition, condition.extract_from):  # h(y) is checked as the preprocessor is
            with pytest.raises(ConditionOutputError, match=message) as info:
                call(torch.rand(1, 3, 16, 16))
            assert str(info.value).startswith(f"condition 'test-bad-output' (plugin '{PLUGIN}') returned a bad control map: ")
            assert isinstance(info.value, PluginError)


@pytest.mark.parametrize("case, output, message", BAD_OUTPUTS, ids=[c[0] for c in BAD_OUTPUTS])
def test_preprocess_fails_in_one_line_and_writes_nothing(case, output, message, tmp_path, capsys):
    source, out = tmp_path / "in.png", tmp_path / "maps" / "out.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8")).save(source)
    with registered(_condition_class(output)):
        code = main(["preprocess", "--condition", "test-bad-output", "--image", str(source), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ccm: error: condition 'test-bad-output' (plugin 'bad-output-plugin')")
    assert "Traceback" not in err
    assert not out.parent.exists() or not any(out.parent.iterdir())  # neither the map nor a partial file


def test_a_good_map_passes_and_slight_rounding_is_clamped(tmp_path):
    with registered(_condition_class(lambda x: _map(x, 1.00005))):
        control = ccm_sdk.get_condition("test-bad-output")(torch.rand(2, 3, 16, 16))
    assert control.shape == (2, 3, 16, 16) and float(control.max()) == 1.0


def test_an_unregistered_condition_is_named_by_its_class():
    condition = _condition_class(lambda x: _map(x, float("nan")))()
    with pytest.raises(ConditionOutputError, match=r"\(class .*BadCondition, not looked up by name\)"):
        condition(torch.rand(1, 3, 16, 16))


def test_check_control_map_returns_a_good_map_unchanged():
    condition = _condition_class(lambda x: x)()
    control = torch.rand(2, 3, 5, 7)
    assert check_control_map(control, condition=condition, batch=2) is control
    assert check_control_map(control.half(), condition=condition).dtype == torch.float16


@pytest.fixture(scope="module")
def pipe(lcm_dir, controlnet_dir):
    from ccm_sdk.pipeline import CCMPipeline

    p = CCMPipeline.from_pretrained(lcm_dir, controlnet=controlnet_dir)
    p.set_progress_bar_config(disable=True)
    return p


def test_the_pipeline_stops_before_any_network_runs(pipe, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the UNet ran on a broken control map")

    monkeypatch.setattr(pipe.unet, "forward", forbidden)
    with registered(_condition_class(lambda x: _map(x, float("nan")))):
        with pytest.raises(ConditionOutputError, match=f"condition 'test-bad-output' \\(plugin '{PLUGIN}'\\)"):
            pipe("x", torch.rand(1, 3, 64, 64), condition="test-bad-output", num_inference_steps=1)

    class ReplacesCall(_condition_class(lambda x: x)):
        def __call__(self, image, **kwargs):  # skips Condition's own check: the pipeline's catches it
            return torch.full((1, 3, 64, 64), float("inf"))

    with pytest.raises(ConditionOutputError, match="got 0 NaN and 12288 infinite"):
        pipe("x", torch.rand(1, 3, 64, 64), condition=ReplacesCall(), num_inference_steps=1)


def test_ccm_serve_answers_500_naming_the_plugin(pipe):
    import json
    import threading
    import urllib.error
    import urllib.request

    from ccm_sdk.app.server import GenerationService, encode_png, make_server, server_url

    service = GenerationService(pipe, model="tiny", condition="test-bad-output")
    server = make_server(service, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    body = json.dumps({"prompt": "x", "image": encode_png(Image.new("RGB", (64, 64))), "steps": 1}).encode()
    request = urllib.request.Request(server_url(server) + "api/generate", data=body, headers={"Content-Type": "application/json"})
    try:
        with registered(_condition_class(lambda x: _map(x, float("nan")))):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=60)
        answer = json.loads(info.value.read())
        assert info.value.code == 500  # the server's plugin is at fault, not the request
        assert answer["type"] == "ConditionOutputError" and f"(plugin '{PLUGIN}')" in answer["error"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
