"""Expected failures of ``ccm generate``/``ccm preprocess``/``ccm train``/``ccm eval``: one line on
stderr and exit code 2, never a traceback; output paths are checked before any model loads."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ccm_sdk import cli
from ccm_sdk.cli import main


def _png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def _make(kind: str, folder):
    """An input file of the given kind; its path."""
    path = folder / f"{kind}.png"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("not an image at all")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(_png(64)[:400])
    elif kind in ("large", "bomb"):
        path.write_bytes(_png(96))
    return path  # "missing": never written


BAD_IMAGES = [
    # (kind of file, extra arguments, message on stderr)
    ("missing", [], r"ccm: error: {opt}: expected an image file, got '.*missing.png', which does not exist"),
    ("directory", [], r"ccm: error: {opt}: expected an image file, got the directory '.*directory.png'"),
    ("empty", [], r"ccm: error: {opt}: expected an image, got the empty file '.*empty.png' \(0 bytes\)"),
    ("text", [], r"ccm: error: {opt}: expected an image, got the file '.*text.png' \(19 bytes\) that no image decoder reads"),
    ("truncated", [], r"ccm: error: {opt}: expected an image, got the file '.*truncated.png' \(400 bytes\) that do not decode"),
    ("large", ["--max-size", "64"], r"ccm: error: {opt}: the image is 96x96 pixels; at most 64x64 pixels are taken \(--max-size raises"),
    ("bomb", [], r"ccm: error: {opt}: the image is too large to decode \(.*decompression bomb"),
]
BAD_IMAGE_IDS = [case[0] for case in BAD_IMAGES]


def _expect_one_line_error(capsys, code: int, pattern: str) -> None:
    import re

    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.fullmatch(pattern + ".*", err), err


@pytest.fixture()
def bomb_limit(monkeypatch, kind):
    """For the "bomb" case, PIL's decompression-bomb limit lowered so a 96x96 image is one (96*96 > 2 * 1000 pixels)."""
    if kind == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


@pytest.mark.parametrize(("kind", "extra", "message"), BAD_IMAGES, ids=BAD_IMAGE_IDS)
def test_preprocess_bad_image(tmp_path, capsys, bomb_limit, kind, extra, message):
    source = _make(kind, tmp_path)
    code = main(["preprocess", "--condition", "canny", "--image", str(source), "--out", str(tmp_path / "c.png"), *extra])
    _expect_one_line_error(capsys, code, message.format(opt="--image"))
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("option", ["--image", "--control"])
@pytest.mark.parametrize(("kind", "extra", "message"), BAD_IMAGES, ids=BAD_IMAGE_IDS)
def test_generate_bad_image(tmp_path, capsys, bomb_limit, lcm_dir, controlnet_dir, option, kind, extra, message):
    source = _make(kind, tmp_path)
    code = main(["generate", "--model", str(lcm_dir), "--controlnet", str(controlnet_dir), "--prompt", "x",
                 option, str(source), "--out", str(tmp_path / "o.png"), *extra])
    _expect_one_line_error(capsys, code, message.format(opt=option))


def test_generate_bad_mask(tmp_path, capsys, lcm_dir, controlnet_dir):
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png(64))
    code = main(["generate", "--model", str(lcm_dir), "--controlnet", str(controlnet_dir), "--prompt", "x", "--condition", "mask",
                 "--image", str(photo), "--mask", str(_make("empty", tmp_path)), "--out", str(tmp_path / "o.png")])
    _expect_one_line_error(capsys, code, r"ccm: error: --mask: expected an image, got the empty file")


BAD_ARGUMENTS = [
    # (arguments, message on stderr); "{tmp}" is the test's folder
    (["--size", "0"], r"ccm: error: --size: expected pixels a side from 1 to 4096 \(--max-size\), got 0"),
    (["--size", "-8"], r"ccm: error: --size: expected pixels a side from 1 to 4096 \(--max-size\), got -8"),
    (["--size", "128", "--max-size", "64"], r"ccm: error: --size: expected pixels a side from 1 to 64 \(--max-size\), got 128"),
    (["--max-size", "0"], r"ccm: error: --max-size: expected pixels a side from 1 to 4096, got 0"),
    (["--max-size", "5000"], r"ccm: error: --max-size: expected pixels a side from 1 to 4096, got 5000"),
    (["--out", "{tmp}"], r"ccm: error: --out: expected an image file path, got the directory '.*'"),
    (["--out", "{tmp}/file.txt/o.png"], r"ccm: error: --out: '.*/file.txt/o.png' lies under '.*/file.txt', which is a file"),
    (["--out", "{tmp}/out/o.xyz"], r"ccm: error: --out: expected an image file name ending in .png, .jpg, .webp .*, got '.*o.xyz'"),
    (["--out", "{tmp}/out/o"], r"ccm: error: --out: expected an image file name ending in .png, .jpg, .webp .*, got '.*/out/o'"),
    (["--seed", str(2**64)], r"ccm: error: --seed: expected an integer from -2\*\*63 to 2\*\*64-1, got 18446744073709551616"),
    (["--seed", str(-(2**63) - 1)], r"ccm: error: --seed: expected an integer from -2\*\*63 to 2\*\*64-1, got -9223372036854775809"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_generate_checks_sizes_and_out_before_loading_the_model(tmp_path, capsys, monkeypatch, arguments, message):
    def forbidden(*args):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_pipeline", forbidden)
    (tmp_path / "file.txt").write_text("a file")
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    out = [] if "--out" in arguments else ["--out", str(tmp_path / "o.png")]
    code = main(["generate", "--prompt", "x", "--image", "in.png", *out, *arguments])
    _expect_one_line_error(capsys, code, message)


def test_preprocess_checks_out_before_running_the_condition(tmp_path, capsys):
    code = main(["preprocess", "--condition", "canny", "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "c.bad")])
    _expect_one_line_error(capsys, code, r"ccm: error: --out: expected an image file name ending in")


def test_out_accepts_the_usual_image_extensions(tmp_path):
    for name in ("a.png", "a.JPG", "a.jpeg", "a.webp", "a.bmp", "new/dir/a.png"):
        assert cli.check_output_path(tmp_path / name) == tmp_path / name


BAD_CONFIGS = [
    # (file name, bytes, message after "config file '<path>'")
    ("binary.yaml", b"\x00\x01\xff\xfe binary", r"is not UTF-8 text \(byte 2 is 0xff\); expected a YAML or JSON file"),
    ("broken.yaml", b"a: [1, 2\n", r"cannot be parsed: .*expected ',' or '\]', but got '<stream end>' at line 2, column 1"),
    ("broken.json", b'{"a": 1,', r"cannot be parsed: Expecting property name enclosed in double quotes"),
    ("list.yaml", b"- 1\n- 2\n", r"should hold a mapping, got list"),
    ("folder.yaml", None, r"is a directory, expected a YAML or JSON file"),
]


@pytest.mark.parametrize("command", [["train", "ct_controlnet"], ["eval"]], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "content", "message"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_files(tmp_path, capsys, command, name, content, message):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    code = main([*command, "--config", str(path)])
    _expect_one_line_error(capsys, code, r"ccm: error: config file '.*" + name + "' " + message)


BAD_CONDITION_OPTIONS = [
    # (options, input image size (width, height), message on stderr): sizes a condition would allocate are bounded
    (["detect_resolution=100000"], (64, 64), r"ccm: error: invalid options for condition 'canny': detect_resolution: "
                                             r"Input should be less than or equal to 4096 \(got 100000\)"),
    (["output_size=[0, 64]"], (64, 64), r"ccm: error: invalid options for condition 'canny': output_size.0: "
                                        r"Input should be greater than or equal to 1 \(got 0\)"),
    (["output_size=[64, 100000]"], (64, 64), r"ccm: error: invalid options for condition 'canny': output_size.1: "
                                             r"Input should be less than or equal to 4096 \(got 100000\)"),
    (["detect_resolution=4096"], (2000, 10), r"ccm: error: condition 'canny': detect_resolution=4096 scales the 10x2000 input "
                                             r"to 4096x819200 pixels; at most 4096x4096 pixels are detected on"),
]


@pytest.mark.parametrize(("options", "size", "message"), BAD_CONDITION_OPTIONS, ids=[" ".join(c[0]) for c in BAD_CONDITION_OPTIONS])
def test_preprocess_bounds_the_sizes_a_condition_allocates(tmp_path, capsys, options, size, message):
    source = tmp_path / "in.png"
    Image.new("RGB", size).save(source)
    option_args = [arg for option in options for arg in ("--option", option)]
    code = main(["preprocess", "--condition", "canny", "--image", str(source), "--out", str(tmp_path / "c.png"), *option_args])
    _expect_one_line_error(capsys, code, message)
    assert not (tmp_path / "c.png").exists()


TRAIN_EVAL_ARGUMENTS = [
    # (command, message on stderr): settings that would fail late (or not at all) are refused before any model loads;
    # "{tmp}" is the test's folder, which holds the file "file.txt" and "damaged/checkpoints"
    (["train", "vae", "output_dir={tmp}/file.txt"], r"ccm: error: output_dir: expected a folder to write into, got the file '.*file.txt'"),
    (["train", "vae", "output_dir={tmp}/file.txt/run"], r"ccm: error: output_dir: '.*file.txt/run' lies under '.*file.txt', which is a file"),
    (["train", "vae", "output_dir={tmp}/damaged"], r"ccm: error: output_dir: expected a folder to write into, got the file '.*damaged/checkpoints'"),
    (["train", "vae", "output_dir={tmp}/run", "train.seed=-1"], r"ccm: error: invalid VAETrainConfig config: train.seed: Input should be greater than or equal to 0"),
    (["train", "vae", "output_dir={tmp}/run", f"train.seed={2**64}"], r"ccm: error: invalid VAETrainConfig config: train.seed: Input should be less than 4294967296"),
    (["train", "vae", "output_dir={tmp}/run", "data.resolution=100000"],
     r"ccm: error: invalid VAETrainConfig config: data.resolution: Input should be less than or equal to 4096"),
    (["eval", "--config", "{config}", "--validate", "--methods", ","], r"ccm: error: --methods: expected comma-separated preset or method names, got ','"),
    (["eval", "--config", "{config}", "--validate", "--stop-after", "soon"], r"ccm: error: expected a duration like 90 \(seconds\), 45s"),
    (["eval", "--config", "{config}", "--validate", "--output-dir", "{tmp}/file.txt"],
     r"ccm: error: output_dir: expected a folder to write into, got the file '.*file.txt'"),
    (["eval", "--config", "{config}", "--validate", "--seed", str(2**64)], r"ccm: error: invalid eval config: seed: Input should be less than 4294967296"),
]


@pytest.mark.parametrize(("command", "message"), TRAIN_EVAL_ARGUMENTS, ids=[" ".join(c[0][:1] + c[0][2:]) for c in TRAIN_EVAL_ARGUMENTS])
def test_train_and_eval_refuse_bad_settings_before_any_work(tmp_path, capsys, monkeypatch, command, message):
    from ccm_sdk.training.core import Trainer

    def forbidden(self):
        raise AssertionError("the trainer set up before its settings were checked")

    monkeypatch.setattr(Trainer, "setup", forbidden)
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "checkpoints").write_text("a file where the checkpoints go")
    config = tmp_path / "eval.yaml"
    config.write_text("dataset: {path: data}\nconditions: [{name: canny}]\nmethods: [dm]\npaper: {dm: dm}\n")
    command = [a.replace("{tmp}", str(tmp_path)).replace("{config}", str(config)) for a in command]
    _expect_one_line_error(capsys, main(command), message)


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_serve_checks_the_port_before_loading_the_model(capsys, monkeypatch, port):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *args: pytest.fail("the model loaded before --port was checked"))
    _expect_one_line_error(capsys, main(["serve", "--port", port]), rf"ccm: error: --port: expected 0 \(any free one\) to 65535, got {port}")
