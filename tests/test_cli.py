"""The ccm command line, run in-process."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ccm_sdk import cli
from ccm_sdk.cli import main


@pytest.fixture()
def photo(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(path)
    return path


def test_generate_with_models_and_condition(tmp_path, lcm_dir, controlnet_dir, photo, capsys):
    out = tmp_path / "out" / "img.png"
    code = main(["generate", "--model", str(lcm_dir), "--controlnet", str(controlnet_dir), "--condition", "canny",
                 "--option", "low_threshold=50", "--image", str(photo), "--prompt", "a cat", "--steps", "2", "--out", str(out)])
    assert code == 0
    assert Image.open(out).size == (64, 64)
    assert Image.open(tmp_path / "out" / "img_control.png").size == (64, 64)
    assert Image.open(tmp_path / "out" / "img_grid.png").width > 128
    assert "2 network evaluations" in capsys.readouterr().out


def test_generate_without_model_uses_tiny_demo_and_says_so(tmp_path, monkeypatch, photo, capsys):
    monkeypatch.setenv("CCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "EMBEDDED_MODEL", "world:not-installed")  # as on a machine without the world's models
    assert main(["generate", "--image", str(photo), "--condition", "canny", "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 0
    assert "UNTRAINED random weights" in capsys.readouterr().err
    assert (tmp_path / "cache" / "tiny-demo" / "model" / "model_index.json").is_file()


def test_generate_takes_a_ready_control_map(tmp_path, lcm_dir, controlnet_dir, photo, capsys):
    out = tmp_path / "img.png"
    args = ["generate", "--model", str(lcm_dir), "--controlnet", str(controlnet_dir), "--prompt", "a cat", "--steps", "1"]
    assert main([*args, "--condition", "canny", "--control", str(photo), "--out", str(out)]) == 0
    # --control is used as it is: the saved control map is the input, not its canny edges
    assert Image.open(tmp_path / "img_control.png").tobytes() == Image.open(photo).convert("RGB").tobytes()
    grid = Image.open(tmp_path / "img_grid.png")
    assert grid.height >= 256  # 64-pixel images are enlarged in the grid
    with pytest.raises(SystemExit, match="not both"):
        main([*args, "--image", str(photo), "--control", str(photo)])
    with pytest.raises(SystemExit, match="--image or --control is required"):
        main(args)


def test_generate_reports_typed_errors(tmp_path, lcm_dir, capsys):
    code = main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_preprocess_writes_control_map(tmp_path, photo, capsys):
    out = tmp_path / "edges.png"
    assert main(["preprocess", "--condition", "canny", "--image", str(photo), "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert main(["preprocess", "--condition", "nope", "--image", str(photo), "--out", str(out)]) == 2
    assert "unknown condition 'nope'" in capsys.readouterr().err


@pytest.fixture()
def mask_file(tmp_path):
    import numpy as np

    region = np.zeros((64, 64), np.uint8)
    region[16:40, 8:56] = 255
    path = tmp_path / "region.png"
    Image.fromarray(region).save(path)
    return path


def test_preprocess_mask_takes_the_region_from_mask(tmp_path, photo, mask_file):
    import numpy as np

    out = tmp_path / "masked.png"
    assert main(["preprocess", "--condition", "mask", "--image", str(photo), "--mask", str(mask_file), "--out", str(out)]) == 0
    control = np.asarray(Image.open(out))
    region = np.asarray(Image.open(mask_file)) > 127
    assert control.shape == (64, 64, 4)
    assert (control[..., 3][region] == 255).all() and (control[..., 3][~region] == 0).all()
    assert (control[..., :3][region] == 0).all()  # the region to generate is blanked
    assert (control[..., :3][~region] == np.asarray(Image.open(photo))[~region]).all()


def test_generate_inpaints_the_mask_region(tmp_path, lcm_dir, photo, mask_file, capsys):
    import numpy as np

    from ccm_sdk.testing.tiny import save_tiny_controlnet

    inpaint_controlnet = save_tiny_controlnet(tmp_path / "cn-mask", lcm_dir, conditioning_channels=4)
    out = tmp_path / "inpainted.png"
    args = ["generate", "--model", str(lcm_dir), "--controlnet", str(inpaint_controlnet), "--prompt", "a cat", "--steps", "1"]
    assert main([*args, "--condition", "mask", "--image", str(photo), "--mask", str(mask_file), "--out", str(out)]) == 0
    control = np.asarray(Image.open(tmp_path / "inpainted_control.png"))
    assert control.shape == (64, 64, 4)
    assert (control[..., 3] > 0).sum() == 24 * 48
    with pytest.raises(SystemExit, match="needs --mask PATH"):
        main([*args, "--condition", "mask", "--image", str(photo)])
    with pytest.raises(SystemExit, match="inpainting region of --condition mask"):
        main([*args, "--condition", "canny", "--image", str(photo), "--mask", str(mask_file)])
    with pytest.raises(SystemExit, match="--mask needs --image"):
        main([*args, "--condition", "mask", "--control", str(photo), "--mask", str(mask_file)])
    assert main([*args, "--condition", "mask", "--image", str(photo), "--mask", str(tmp_path / "no.png"), "--out", str(out)]) == 2
    assert "no.png" in capsys.readouterr().err


def test_serve_inpainting_starts_with_the_picture_and_its_mask(tmp_path, lcm_dir, photo, mask_file, monkeypatch):
    import numpy as np

    from ccm_sdk.app import server as server_module
    from ccm_sdk.testing.tiny import save_tiny_controlnet

    started = {}

    class _Server:
        server_address = ("127.0.0.1", 1)

        def serve_forever(self):
            raise KeyboardInterrupt  # as Ctrl-C: cmd_serve returns

        def server_close(self):
            started["closed"] = True

    def fake_make_server(service, **kwargs):
        started["service"] = service
        return _Server()

    monkeypatch.setattr(server_module, "make_server", fake_make_server)
    inpaint_controlnet = save_tiny_controlnet(tmp_path / "cn-mask", lcm_dir, conditioning_channels=4)
    assert main(["serve", "--model", str(lcm_dir), "--controlnet", str(inpaint_controlnet), "--condition", "mask",
                 "--image", str(photo), "--mask", str(mask_file), "--prompt", "a cat"]) == 0
    info = started["service"].info()
    assert started["closed"] and info["control_channels"] == 4
    assert np.array_equal(np.asarray(server_module.decode_image(info["image"], field="image")), np.asarray(Image.open(photo)))
    assert np.array_equal(np.asarray(server_module.decode_image(info["mask"], field="mask")), np.asarray(Image.open(mask_file)))


def test_serve_help_lists_the_limits_and_access_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option, default in [("--host HOST", "default: 127.0.0.1"), ("--max-size PIXELS", "default: the model's native size"),
                            ("--max-queue N", "default: 4"), ("--read-timeout SECONDS", "default: 10.0"),
                            ("--max-connections N", "default: 32"), ("--allow-host NAME", "default: only localhost, 127.0.0.1, [::1]"),
                            ("--allow-origin ORIGIN", "default: only the server's own page")]:
        assert option in text and default in text, option


def test_serve_passes_the_limits_and_access_options_on(lcm_dir, monkeypatch, capsys):
    from ccm_sdk.app import server as server_module

    made = {}

    class _Server:
        server_address = ("127.0.0.1", 1)

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            pass

    def fake_make_server(service, **kwargs):
        made.update(kwargs, service=service)
        return _Server()

    monkeypatch.setattr(server_module, "make_server", fake_make_server)
    assert main(["serve", "--model", str(lcm_dir), "--max-size", "128", "--max-queue", "2", "--read-timeout", "3",
                 "--max-connections", "5", "--allow-host", "box.lan", "--allow-host", "pc.lan", "--allow-origin", "https://a.example"]) == 0
    assert made["service"].max_size == 128 and made["service"]._queue.max_waiting == 2
    assert made["allow_hosts"] == ["box.lan", "pc.lan"] and made["allow_origins"] == ["https://a.example"]
    assert made["read_timeout"] == 3.0 and made["max_connections"] == 5 and made["host"] == "127.0.0.1"
    assert main(["serve", "--model", str(lcm_dir), "--max-size", "16"]) == 2
    assert "max_size: expected pixels a side from the drawing size 64 to 4096, got 16" in capsys.readouterr().err


def test_plugins_and_conditions_listing(capsys):
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = {p["name"] for p in listing["plugins"]}
    assert "ccm_sdk.builtin.samplers" in names and "failed" in listing
    assert main(["conditions"]) == 0
    assert "canny" in capsys.readouterr().out


@pytest.mark.slow
def test_serve_starts_a_server_that_generates(tmp_path, lcm_dir, controlnet_dir, photo):
    import base64
    import io
    import os
    import subprocess
    import sys
    import urllib.request

    command = [sys.executable, "-m", "ccm_sdk.cli", "serve", "--model", str(lcm_dir), "--controlnet", str(controlnet_dir),
               "--control", str(photo), "--prompt", "a cat", "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = server.stdout.readline()
        assert line.startswith("ccm serve: open http://127.0.0.1:"), (line, server.stderr.read() if server.poll() is not None else "")
        url = line.split()[3]
        with urllib.request.urlopen(url + "api/info", timeout=60) as answer:
            info = json.loads(answer.read())
        assert info["prompt"] == "a cat" and info["size"] == [64, 64]
        body = json.dumps({"prompt": "a cat", "control": info["control"], "steps": 1}).encode()
        request = urllib.request.Request(url + "api/generate", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            result = json.loads(answer.read())
        image = Image.open(io.BytesIO(base64.b64decode(result["image"].split(",", 1)[1])))
        assert image.size == (64, 64) and result["nfe"] == 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_generate_reads_the_sdxl_family_from_the_model_folder(tmp_path, sdxl_dir, sdxl_lcm_dir, sdxl_controlnet_dir, photo, capsys):
    out = tmp_path / "xl.png"
    args = ["generate", "--model", str(sdxl_dir), "--unet", str(sdxl_lcm_dir / "unet"), "--controlnet", str(sdxl_controlnet_dir),
            "--control", str(photo), "--prompt", "a cat", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    assert Image.open(out).size == (64, 64)
    assert "2 network evaluations" in capsys.readouterr().out  # the LCM UNet: no classifier-free guidance
    assert main([*args[:3], *args[5:], "--sampler", "ddim", "--out", str(tmp_path / "dm.png")]) == 0
    assert "4 network evaluations" in capsys.readouterr().out  # the plain SDXL UNet: DDIM with guidance
