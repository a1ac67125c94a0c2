"""The models shipped in ``ccm_world/models``: intact, loadable as ``world:<name>``, and the embedded
default follows its control map. Skipped where the pack is not installed."""

from __future__ import annotations

import json

import pytest
import torch

import ccm_world
from ccm_sdk.cli import embedded_default
from ccm_sdk.eval.fidelity import line_f1_per_image
from ccm_sdk.pipeline import CCMPipeline
from ccm_world.build.config import load_preset
from ccm_world.build.pack import MANIFEST, file_table, load_model
from ccm_world.build.stages import world_data

MODELS = ccm_world.MODELS_DIR
pytestmark = pytest.mark.skipif(not (MODELS / MANIFEST).is_file(), reason="the world models are not packed here")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((MODELS / MANIFEST).read_text())


def test_every_shipped_file_matches_the_manifest_and_the_pack_is_within_60_mb(manifest):
    assert manifest["preset"] == "full"
    assert file_table(MODELS) == manifest["files"]  # sizes and sha256: no file lost, changed or added
    assert manifest["total_bytes"] == sum(entry["bytes"] for entry in manifest["files"].values()) <= 60e6


def test_the_issue_s_models_are_all_shipped(manifest):
    conditions = ("sketch", "canny", "hed", "depth", "pose", "mask", "sr")
    expected = {"lcm", "teacher", "adapter", "feature-net", *(f"dm-controlnet-{c}" for c in conditions)}
    expected |= {f"cm-controlnet-{c}" for c in ("sketch", "depth", "mask", "sr", "canny")}
    expected |= {"depth-net", "pose-net"}  # the map nets that score depth and pose Fidelity
    assert expected <= set(manifest["models"])


@pytest.mark.slow
def test_every_shipped_model_loads_by_its_world_name(manifest):
    for name, entry in manifest["models"].items():
        assert load_model(entry["kind"], f"world:{name}") is not None, name


@pytest.mark.slow
def test_the_embedded_default_draws_the_sketch_it_is_given():
    """Line F1 of the LCM with the default sketch ControlNet against the LCM alone, same prompts and seeds.

    Measured on 256 held-out scenes (configs/eval/world_prompt_following.yaml, the second version):
    0.79 with the ControlNet, 0.18 without.
    """
    lcm, controlnet = embedded_default("sketch")
    scenes = world_data(load_preset("full"), ("sketch",), seed_offset=1, length=12)
    items = [scenes[i] for i in range(len(scenes))]
    captions = [item["caption"] for item in items]
    sketches = torch.stack([item["controls"]["sketch"] for item in items])

    def generate(pipe, **control):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(captions, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt", **control)
        return out.images

    controlled = generate(CCMPipeline.from_pretrained(lcm, controlnet=controlnet), control_image=sketches)
    free = generate(CCMPipeline.from_pretrained(lcm))
    assert torch.isfinite(controlled).all() and controlled.shape == (12, 3, 64, 64)
    with_control = line_f1_per_image("sketch", controlled, sketches).mean().item()
    without = line_f1_per_image("sketch", free, sketches).mean().item()
    assert with_control > 0.5 and with_control > without + 0.3, (with_control, without)


@pytest.mark.slow
def test_noise_levels_command_on_the_shipped_models(tmp_path, capsys):
    from ccm_world.build import cli

    out = tmp_path / "levels"
    code = cli(["noise-levels", "--condition", "sketch", "--out", str(out), "--scenes", "6", "--strengths", "0.1,1.0", "--grid", "0,48",
                "no control=", "DM's ControlNet=world:dm-controlnet-sketch", "with the adapter=world:dm-controlnet-sketch+world:adapter"])  # fmt: skip
    assert code == 0
    saved = json.loads((out / "noise-levels.json").read_text())
    curves = [c for c in saved if c["metric"] == "reconstruction"]
    assert [c["label"] for c in curves] == ["no control", "DM's ControlNet", "with the adapter"] and curves[0]["timesteps"] == [99, 999]
    assert [c["timesteps"] for c in saved if c["metric"] == "consistency"] == [[39, 999]] * 3
    assert curves[2]["errors"] != curves[1]["errors"]  # the adapter changes what the ControlNet adds
    # from pure noise the sketch tells the model where the shapes are: a lower error than the caption alone
    assert curves[1]["errors"][1] < curves[0]["errors"][1]
    assert (out / "noise-levels.png").is_file() and (out / "consistency.png").is_file() and capsys.readouterr().out == (out / "noise-levels.md").read_text()
    assert cli(["noise-levels", "--condition", "sketch", "--out", str(out), "no-equals-sign"]) == 2
    assert cli(["noise-levels", "--condition", "sketch", "--out", str(out), "adapter only=+world:adapter"]) == 2
    assert "LABEL=CONTROLNET+ADAPTER" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["noise-levels", "--condition", "sketch", "--out", str(out), "--strengths", "0.1,high", "no control="])
    assert "comma-separated numbers" in capsys.readouterr().err
