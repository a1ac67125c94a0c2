"""The eval runner and ``ccm eval`` end to end on tiny random models (plumbing, not quality)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk.cli import main
from ccm_sdk.errors import FactoryNotAllowedError, InputError
from ccm_sdk.eval.config import check_names, expand_methods, load_eval_config
from ccm_sdk.eval.runner import build_dataset, run_evaluation
from ccm_sdk.models.adapter import UnifiedAdapter
from ccm_sdk.testing import tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory, lcm_dir, sd_dir, controlnet_dir, sd_controlnet_dir):
    root = tmp_path_factory.mktemp("eval-models")
    mask_dm = tiny.save_tiny_controlnet(root / "dm-mask", sd_dir, conditioning_channels=4, seed=5)
    mask_cm = tiny.save_tiny_controlnet(root / "cm-mask", lcm_dir, conditioning_channels=4, seed=6)
    adapter = UnifiedAdapter.for_controlnet(tiny.tiny_controlnet(tiny.tiny_unet())).save_pretrained(root / "adapter")
    return {
        "dm": str(sd_dir), "cm": str(lcm_dir), "adapter": str(adapter),
        "dm_controlnets": {"canny": str(sd_controlnet_dir), "mask": str(mask_dm)},
        "cm_controlnets": {"canny": str(controlnet_dir), "mask": str(mask_cm)},
        "dm_steps": [2], "cm_steps": [2, 1],
    }  # fmt: skip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Six 32 px images of a coloured box on a plain background, with captions."""
    root = tmp_path_factory.mktemp("eval-data")
    rng = np.random.default_rng(0)
    for i in range(6):
        image = np.full((32, 32, 3), rng.integers(0, 256, 3), np.uint8)
        top, left = rng.integers(2, 16, 2)
        image[top : top + 12, left : left + 12] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a box number {i}")
    return root


def _config(models, image_folder, tmp_path, **changes):
    raw = {
        "output_dir": str(tmp_path / "out"),
        "dataset": {"path": str(image_folder)},
        "num_samples": 4, "batch_size": 4, "device": "cpu", "warmup": False, "show": 2,
        "conditions": [{"name": "canny", "options": {"low_threshold": 50, "high_threshold": 100}}, {"name": "mask"}],
        "methods": ["dm-controlnet+dm", "dm-controlnet+cm", "dm-controlnet+cm+adapter", "cm-controlnet+cm", "cm-controlnet+dm"],
        "paper": models,
    }  # fmt: skip
    raw.update(changes)
    return load_eval_config(raw)


def test_table2_methods_and_reverse_transfer_end_to_end(models, image_folder, tmp_path):
    result = run_evaluation(_config(models, image_folder, tmp_path), log=None)
    by_key = {(r.method, r.steps, r.condition): r for r in result.rows}
    assert len(result.rows) == 2 * (1 + 2 + 2 + 2 + 1)  # conditions x (method, steps)
    assert by_key[("DM's ControlNet + DM", 2, "canny")].nfe == 4  # DDIM with CFG: two calls a step
    assert by_key[("CM's ControlNet + DM", 2, "mask")].nfe == 4
    assert by_key[("DM's ControlNet + CM", 1, "canny")].nfe == 1
    assert by_key[("CM's ControlNet + CM", 2, "mask")].nfe == 2
    for row in result.rows:
        assert np.isfinite(row.fid) and row.fid >= 0 and 0 <= row.fidelity <= 1 and row.seconds_per_image > 0
    # a fresh unified adapter is the identity, and every method draws the same noise per sample
    torch.testing.assert_close(result.samples[("DM's ControlNet + CM + adapter", 2, "canny")],
                               result.samples[("DM's ControlNet + CM", 2, "canny")])  # fmt: skip
    assert by_key[("DM's ControlNet + CM + adapter", 1, "mask")].fid == pytest.approx(by_key[("DM's ControlNet + CM", 1, "mask")].fid)
    assert result.real_fidelity == {"canny": 0.0, "mask": 0.0}  # controls extracted from the real images
    paths = result.write()
    table = paths["markdown"].read_text()
    assert "| DM's ControlNet + DM | 2 | 4 |" in table and "real images (Fidelity floor)" in table
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == len(result.rows) and {"fid", "fidelity", "nfe", "seconds_per_image"} <= set(rows[0])
    assert json.loads(paths["json"].read_text())["features"] == "pixels-8"
    for kind in ("samples", "metrics"):
        assert Image.open(paths[kind]).size[0] > 200


def test_fidelity_standard_error_and_the_flat_image_reference(models, image_folder, tmp_path):
    from ccm_sdk.eval.fidelity import fidelity_per_image
    from ccm_sdk.eval.report import fidelity_noise

    canny = {"name": "canny", "options": {"low_threshold": 50, "high_threshold": 100}, "line_f1": {"tolerance": 1}}
    config = _config(models, image_folder, tmp_path, methods=["cm"], show=4, conditions=[{"name": "mask"}, canny])
    result = run_evaluation(config, log=None)
    assert len(result.rows) == 4
    # a flat image has no edges, so it scores the share of edge pixels in c: the metric's "empty" reference
    assert result.flat_fidelity["canny"] == pytest.approx(float(result.controls["canny"].double().mean()))
    assert result.flat_fidelity["canny"] > 0
    assert result.flat_fidelity["mask"] > result.real_fidelity["mask"] == 0
    assert result.real_line_f1 == {"canny": 1.0}  # c = canny(x_real): h(x_real) draws exactly c's lines
    for row in result.rows:  # line F1 where the condition asks for it, and only there
        assert (0 <= row.line_f1 <= 1) if row.condition == "canny" else math.isnan(row.line_f1)
    for row in (r for r in result.rows if r.condition == "mask"):  # show == num_samples: every image the cell scored
        values = fidelity_per_image("mask", result.samples[(row.method, row.steps, "mask")], result.controls["mask"])
        assert row.fidelity == pytest.approx(float(values.mean()))
        assert row.fidelity_sem == pytest.approx(float(values.std() / 2)) and row.fidelity_sem > 0
    table = result.write()["markdown"].read_text()
    assert f"| flat images (mean colour, no content) | - | - | - | - / {result.flat_fidelity['mask']:.3f} |" in table
    canny_f1 = next(r.line_f1 for r in result.rows if r.condition == "canny" and r.steps == 2)
    assert "| method | steps | canny (±1 px) |" in table and f"| CM, no control | 2 | {canny_f1:.3f} |" in table
    assert "| real images | - | 1.000 |" in table
    low, high = min(r.fidelity_sem for r in result.rows), max(r.fidelity_sem for r in result.rows)
    assert f"standard error (standard deviation over a cell's images / sqrt(images)) is {low:.4f} to {high:.4f}" in table
    assert "fidelity_sem" in next(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    unknown = [dataclasses.replace(result.rows[0], fidelity_sem=float("nan"))]  # e.g. cells kept by an older version
    assert fidelity_noise(unknown) == ""


def test_uncontrolled_reference_rows(models, image_folder, tmp_path, lcm_dir):
    from ccm_sdk.pipeline import CCMPipeline

    config = _config(models, image_folder, tmp_path, methods=["cm", "cm-controlnet+cm"], num_samples=2, batch_size=2)
    result = run_evaluation(config, log=None)
    by_key = {(r.method, r.steps, r.condition): r for r in result.rows}
    assert by_key[("CM, no control", 1, "canny")].nfe == 1
    # the caption alone, with the eval's seeds: the same images for every condition, and not the controlled ones
    plain = result.samples[("CM, no control", 2, "canny")]
    torch.testing.assert_close(plain, result.samples[("CM, no control", 2, "mask")])
    assert not torch.allclose(plain, result.samples[("CM's ControlNet + CM", 2, "canny")])
    pipe = CCMPipeline.from_pretrained(lcm_dir)
    captions = [(image_folder / f"{i:02d}.txt").read_text() for i in range(2)]
    direct = pipe(captions, height=32, width=32, num_inference_steps=2, generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt").images
    torch.testing.assert_close(plain, direct.float())
    assert by_key[("CM, no control", 2, "canny")].fidelity != by_key[("CM's ControlNet + CM", 2, "canny")].fidelity


def test_dataset_control_maps_and_a_factory_dataset(models, tmp_path, monkeypatch):
    module = tmp_path / "tiny_eval_data.py"
    module.write_text(
        "import torch\n"
        "def make(n=4):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [{'image': torch.rand(3, 32, 32, generator=g), 'caption': 'x',\n"
        "             'controls': {'edges': (torch.rand(1, 32, 32, generator=g) > 0.9).float()}} for _ in range(n)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CCM_ALLOW_DATASET_FACTORY", "1")  # the config names code to run: opted in
    config = load_eval_config({
        "output_dir": str(tmp_path / "out"), "dataset": {"factory": "tiny_eval_data:make", "options": {"n": 3}},
        "num_samples": 3, "device": "cpu", "warmup": False,
        "conditions": [{"name": "canny", "control": "dataset", "key": "edges"}],
        "methods": [{"name": "ct", "model": models["cm"], "controlnets": {"canny": models["cm_controlnets"]["canny"]}, "steps": [1]}],
    })  # fmt: skip
    result = run_evaluation(config, log=None)
    assert [(r.method, r.steps, r.nfe) for r in result.rows] == [("ct", 1, 1)]
    assert result.controls["canny"].shape == (3, 3, 32, 32)  # 1-channel maps widened to the condition's 3
    assert result.real_fidelity["canny"] > 0  # random maps are not canny's output: the floor shows it
    assert math.isnan(result.real_colour_accuracy) and math.isnan(result.rows[0].colour_accuracy)  # no colour targets
    assert math.isnan(result.real_shape_accuracy) and math.isnan(result.rows[0].limb_accuracy)  # nor shape or limb targets
    assert math.isnan(result.fid_floor)  # 3 items: no second set of 3
    with pytest.raises(InputError, match="fewer than num_samples=5"):
        run_evaluation(config.model_copy(update={"num_samples": 5}), log=None)
    bad = config.model_copy(update={"dataset": config.dataset.model_copy(update={"factory": "no_such_module:make"})})
    with pytest.raises(InputError, match="not an importable"):
        run_evaluation(bad, log=None)


def _factory_config(models, tmp_path, monkeypatch, module: str, n: int) -> dict:
    """An eval config over ``<module>.make(n)`` written into ``tmp_path``: one ControlNet method at 1 step, 3 samples."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CCM_ALLOW_DATASET_FACTORY", "1")  # the config names code to run: opted in
    return {
        "output_dir": str(tmp_path / "out"), "dataset": {"factory": f"{module}:make", "options": {"n": n}},
        "num_samples": 3, "device": "cpu", "warmup": False,
        "conditions": [{"name": "canny", "control": "dataset", "key": "edges"}],
        "methods": [{"name": "ct", "model": models["cm"], "controlnets": {"canny": models["cm_controlnets"]["canny"]}, "steps": [1]}],
    }  # fmt: skip


def test_colour_column_and_fid_floor_for_a_dataset_with_colour_targets(models, tmp_path, monkeypatch):
    module = tmp_path / "tiny_colour_data.py"
    module.write_text(
        "import torch\n"
        "from ccm_sdk.eval.colour import ColourTargets\n"
        "PALETTE = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])\n"
        "REGIONS = torch.zeros(32, 32, dtype=torch.long)\n"
        "REGIONS[8:24, 8:24] = 1\n"
        "class Data(list):\n"
        "    def colour_targets(self, index):\n"
        "        return ColourTargets(REGIONS, torch.tensor([index % 2, 1 - index % 2]), PALETTE)\n"
        "def make(n=6):\n"
        "    items = []\n"
        "    for i in range(n):\n"
        "        image = PALETTE[REGIONS if i % 2 == 0 else 1 - REGIONS].permute(2, 0, 1).contiguous()\n"
        "        items.append({'image': image, 'caption': 'x', 'controls': {'edges': torch.zeros(1, 32, 32)}})\n"
        "    return Data(items)\n"
    )
    raw = _factory_config(models, tmp_path, monkeypatch, "tiny_colour_data", 6)
    result = run_evaluation(load_eval_config(raw), log=None)
    assert result.real_colour_accuracy == 1.0  # the real images are painted exactly as asked
    assert 0.0 <= result.rows[0].colour_accuracy <= 1.0
    assert math.isfinite(result.fid_floor) and result.fid_floor >= 0.0
    result.write(tmp_path / "report")
    report = (tmp_path / "report" / "results.md").read_text()
    assert "Colour accuracy" in report and "| real images | - | 1.000 |" in report and "FID floor" in report
    # too few items for a second real set: no floor; no colour targets: no colour column
    small = run_evaluation(load_eval_config({**raw, "dataset": {"factory": "tiny_colour_data:make", "options": {"n": 5}}}), log=None)
    assert math.isnan(small.fid_floor)
    assert math.isnan(run_evaluation(load_eval_config({**raw, "fid_floor": False}), log=None).fid_floor)


def test_shape_and_limb_columns_for_a_dataset_with_their_targets(models, tmp_path, monkeypatch):
    module = tmp_path / "tiny_prompt_data.py"
    module.write_text(
        "import torch\n"
        "from ccm_sdk.eval.limbs import LimbTargets\n"
        "from ccm_sdk.eval.shape import ShapeTargets\n"
        "SQUARE = torch.zeros(32, 32, dtype=torch.bool)\n"
        "SQUARE[8:24, 8:24] = True\n"
        "PLUS = torch.zeros(32, 32, dtype=torch.bool)\n"
        "PLUS[8:24, 13:19] = True\n"
        "PLUS[13:19, 8:24] = True\n"
        "class Data(list):\n"
        "    def shape_targets(self, index):\n"
        "        return ShapeTargets(torch.stack([SQUARE, PLUS])[None], torch.tensor([0]), SQUARE[None], torch.ones(1, 32, 32, dtype=torch.bool))\n"
        "    def limb_targets(self, index):\n"
        "        return LimbTargets(torch.tensor([[[4.5, 28.5], [27.5, 28.5]]]), 'canny')\n"
        "def make(n=3):\n"
        "    items = []\n"
        "    for i in range(n):\n"
        "        image = torch.zeros(3, 32, 32)\n"
        "        image[:, SQUARE] = 1.0\n"
        "        image[:, 28, 4:28] = 1.0  # the limb, a white line\n"
        "        items.append({'image': image, 'caption': 'x', 'controls': {'edges': torch.zeros(1, 32, 32)}})\n"
        "    return Data(items)\n"
    )
    raw = _factory_config(models, tmp_path, monkeypatch, "tiny_prompt_data", 3)
    result = run_evaluation(load_eval_config(raw), log=None)
    assert result.real_shape_accuracy == 1.0 and result.real_limb_accuracy == 1.0  # drawn exactly as the targets say
    assert 0.0 <= result.rows[0].shape_accuracy <= 1.0 and 0.0 <= result.rows[0].limb_accuracy <= 1.0
    assert math.isnan(result.rows[0].colour_accuracy)  # no colour targets
    result.write(tmp_path / "report")
    report = (tmp_path / "report" / "results.md").read_text()
    assert "Shape accuracy" in report and "Limb accuracy" in report and "Colour accuracy" not in report
    assert report.count("| real images | - | 1.000 |") == 2
    assert {"shape_accuracy", "limb_accuracy"} <= set((tmp_path / "report" / "results.csv").read_text().splitlines()[0].split(","))


def test_ccm_eval_command(models, image_folder, tmp_path, capsys):
    config = _config(models, image_folder, tmp_path, methods=["cm-controlnet+cm"], conditions=[{"name": "canny"}])
    path = tmp_path / "eval.json"
    path.write_text(config.model_dump_json())
    assert main(["eval", "--config", str(path), "--validate"]) == 0
    assert "valid (1 methods x 1 conditions)" in capsys.readouterr().out
    out = tmp_path / "cli-out"
    assert main(["eval", "--config", str(path), "--output-dir", str(out), "--num-samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| CM's ControlNet + CM | 2 |" in printed and (out / "results.md").is_file()
    assert main(["eval", "--config", str(path), "--output-dir", str(tmp_path / "seed-3"), "--num-samples", "2", "--seed", "3"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "seed-3" / "results.json").read_text())["config"]["seed"] == 3
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == config.seed
    assert main(["eval", "--config", str(path), "--methods", "dm-controlnet+gan", "--validate"]) == 2
    assert "unknown eval method 'dm-controlnet+gan'" in capsys.readouterr().err


def _count_generations(monkeypatch) -> list[int]:
    from ccm_sdk.eval import runner

    calls: list[int] = []
    original = runner._generate

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "_generate", counted)
    return calls


def test_a_stopped_evaluation_keeps_its_cells_and_resumes(models, image_folder, tmp_path, monkeypatch):
    from ccm_sdk.errors import EvalInterrupted, Interrupted
    from ccm_sdk.utils import stopping as stop

    config = _config(models, image_folder, tmp_path, methods=["dm-controlnet+cm", "cm-controlnet+cm"], conditions=[{"name": "canny"}])
    reference = run_evaluation(config, log=None)
    progress = tmp_path / "progress"
    now = [0.0]
    monkeypatch.setattr(stop, "monotonic", lambda: now[0])
    calls = _count_generations(monkeypatch)
    original = stop.StopSignals.requested

    def requested(self, accelerator=None):  # the limit runs out while the first cell is made
        now[0] = 100.0
        return original(self, accelerator)

    monkeypatch.setattr(stop.StopSignals, "requested", requested)
    with stop.time_limit(50), pytest.raises(EvalInterrupted, match=r"stopped by the time limit after 1 of 4 cells.*--resume"):
        run_evaluation(config, log=None, progress=progress)
    assert len(calls) == 1 and len(list(progress.iterdir())) == 1
    assert issubclass(EvalInterrupted, Interrupted)
    monkeypatch.setattr(stop.StopSignals, "requested", original)
    lines: list[str] = []
    resumed = run_evaluation(config, log=lines.append, progress=progress, resume=True)
    assert len(calls) == 1 + 3  # the kept cell is not generated again
    assert sum("(kept from an earlier run)" in line for line in lines) == 1
    assert [(r.method, r.steps, r.condition) for r in resumed.rows] == [(r.method, r.steps, r.condition) for r in reference.rows]
    for ours, theirs in zip(resumed.rows, reference.rows):
        assert ours.fid == pytest.approx(theirs.fid, abs=1e-6) and ours.fidelity == pytest.approx(theirs.fidelity, abs=1e-6)
    for key, images in reference.samples.items():
        torch.testing.assert_close(resumed.samples[key], images, atol=1e-3, rtol=0)  # kept as float16
    # another config does not reuse them; without resume they are cleared
    other = _config(models, image_folder, tmp_path, methods=["dm-controlnet+cm", "cm-controlnet+cm"], conditions=[{"name": "canny"}], seed=1)
    run_evaluation(other, log=None, progress=progress, resume=True)
    assert len(calls) == 4 + 4
    run_evaluation(config, log=None, progress=progress, methods=["cm-controlnet+cm"])
    assert len(calls) == 8 + 2 and len(list(progress.iterdir())) == 2
    # a method and a condition added to the config: the cells already made are kept
    config.methods.append("cm")
    config.conditions.append(config.conditions[0].model_copy(update={"label": "edges"}))
    for nets in (config.paper.dm_controlnets, config.paper.cm_controlnets):
        nets["edges"] = nets["canny"]
    lines.clear()
    run_evaluation(config, log=lines.append, progress=progress, resume=True)
    # made: the dm-controlnet+cm cells were cleared by the run without resume (2), edges for both methods (4), cm (4)
    assert len(calls) == 10 + 2 + 4 + 4 and sum("(kept from an earlier run)" in line for line in lines) == 2
    # a changed method setting makes that method's cells again, and only those
    config = config.model_copy(update={"paper": config.paper.model_copy(update={"cm_guidance_scale": 3.0})})
    run_evaluation(config, log=None, progress=progress, resume=True)
    assert len(calls) == 20 + 3 * 2 * 2  # every CM method (the CM's guidance), 2 steps x 2 conditions; not dm's


def test_kept_cells_follow_the_models_contents_not_their_place(models, image_folder, tmp_path, monkeypatch):
    """A model trained again under the same path makes its cells again; the same files in another
    clone (the same relative paths, new modification times) keep them."""
    import shutil

    from safetensors.torch import load_file, save_file

    clone = tmp_path / "clone-a"
    shutil.copytree(models["cm_controlnets"]["canny"], clone / "nets" / "cm-canny")
    paper = {**models, "cm_controlnets": {"canny": "nets/cm-canny"}}
    config = _config(models, image_folder, tmp_path, methods=["cm-controlnet+cm"], conditions=[{"name": "canny"}], paper=paper)
    calls = _count_generations(monkeypatch)
    progress = tmp_path / "progress"
    monkeypatch.chdir(clone)
    run_evaluation(config, log=None, progress=progress)
    assert len(calls) == 2  # 2 steps and 1
    other = shutil.copytree(clone, tmp_path / "clone-b")
    monkeypatch.chdir(other)
    run_evaluation(config, log=None, progress=progress, resume=True)
    assert len(calls) == 2
    weights = other / "nets" / "cm-canny" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(weights))  # trained again, same path
    run_evaluation(config, log=None, progress=progress, resume=True)
    assert len(calls) == 4
    run_evaluation(config, log=None, progress=progress, resume=True)
    assert len(calls) == 4


def test_ccm_eval_stop_after_and_resume(models, image_folder, tmp_path, capsys, monkeypatch):
    from ccm_sdk.utils import stopping as stop

    config = _config(models, image_folder, tmp_path, methods=["cm-controlnet+cm"], conditions=[{"name": "canny"}])
    path = tmp_path / "eval.json"
    path.write_text(config.model_dump_json())
    clock = iter([0.0])  # the limit is set at 0; every later reading is past it
    monkeypatch.setattr(stop, "monotonic", lambda: next(clock, 1e6))
    args = ["eval", "--config", str(path), "--output-dir", str(tmp_path / "out")]
    assert main([*args, "--stop-after", "1m"]) == 1
    assert "ccm: stopped: the evaluation was stopped by the time limit after 1 of 2 cells" in capsys.readouterr().err
    calls = _count_generations(monkeypatch)
    assert main([*args, "--resume"]) == 0
    assert len(calls) == 1 and "(kept from an earlier run)" in capsys.readouterr().out
    assert main([*args, "--stop-after", "never"]) == 2


def test_time_per_image_is_the_fastest_full_batch(models, image_folder, tmp_path):
    """Other work on the machine only slows batches down: the cell reports its fastest full batch."""
    from types import SimpleNamespace

    from ccm_sdk.eval import runner

    config = _config(models, image_folder, tmp_path, num_samples=5, batch_size=2, methods=["dm-controlnet+cm"])
    method = runner.expand_methods(config, None)[0]
    seconds = iter([4.0, 1.0, 0.1])  # per call: 2.0, 0.5 and (a batch of one) 0.1 s an image

    def pipe(captions, controls, **kwargs):
        return SimpleNamespace(images=torch.zeros(len(captions), 3, 8, 8), nfe=1, timings={"total": next(seconds)})

    images, nfe, per_image = runner._generate(pipe, method, None, 1, ["a"] * 5, torch.zeros(5, 3, 8, 8), config)
    assert images.shape[0] == 5 and nfe == 1 and per_image == 0.5


@pytest.mark.parametrize(
    "setting", [None, "", "0", "true", "yes"], ids=["unset", "empty", "zero", "true", "yes"]
)
def test_a_dataset_factory_runs_only_with_the_opt_in(tmp_path, monkeypatch, setting):
    """Without CCM_ALLOW_DATASET_FACTORY=1 no factory is imported or called, under --validate or a run."""
    marker = tmp_path / "ran"
    module = f"factory_with_effects_{setting}"  # a fresh module per case: an imported one would not run again
    (tmp_path / f"{module}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\ndef make(): return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    if setting is None:
        monkeypatch.delenv("CCM_ALLOW_DATASET_FACTORY", raising=False)
    else:
        monkeypatch.setenv("CCM_ALLOW_DATASET_FACTORY", setting)
    config = load_eval_config({
        "output_dir": str(tmp_path / "out"), "dataset": {"factory": f"{module}:make"},
        "num_samples": 2, "device": "cpu", "conditions": [{"name": "canny"}],
        "methods": [{"name": "m", "model": "unused", "controlnets": {"canny": "unused"}}],
    })  # fmt: skip
    message = rf"dataset.factory '{module}:make' would import and call code .* CCM_ALLOW_DATASET_FACTORY=1 .*, got CCM_ALLOW_DATASET_FACTORY={setting or ''!r}"
    with pytest.raises(FactoryNotAllowedError, match=message):
        check_names(config, expand_methods(config))
    with pytest.raises(FactoryNotAllowedError, match=message):
        build_dataset(config)
    assert not marker.exists()
    monkeypatch.setenv("CCM_ALLOW_DATASET_FACTORY", "1")
    assert build_dataset(config) == [] and marker.read_text() == "imported"


def test_cells_show_their_progress(models, image_folder, tmp_path, capsys):
    config = _config(models, image_folder, tmp_path, num_samples=4, batch_size=2, conditions=[{"name": "canny"}],
                     methods=["cm-controlnet+cm"])  # fmt: skip
    result = run_evaluation(config, log=None, show_progress=True)
    err = capsys.readouterr().err
    assert "CM's ControlNet + CM | 2 steps | canny" in err and "CM's ControlNet + CM | 1 steps | canny" in err
    assert "4/4" in err and "image/s" in err  # the cell's images, counted a batch at a time
    assert "scoring" in err and len(result.rows) == 2
    run_evaluation(config, log=None)  # no log: no bar
    assert "image/s" not in capsys.readouterr().err


def test_cm_guidance_left_out_is_the_models_recommended_scale(models, image_folder, tmp_path, monkeypatch):
    import shutil

    from ccm_sdk.models.generation_defaults import GenerationDefaults, write_generation_defaults
    from ccm_sdk.pipeline import CCMPipeline

    lcm = shutil.copytree(models["cm"], tmp_path / "lcm")
    write_generation_defaults(lcm, GenerationDefaults(guidance_scale=3.5))
    used: list[float] = []
    original = CCMPipeline.prepare_prompt
    monkeypatch.setattr(CCMPipeline, "prepare_prompt", lambda self, prompt, **kw: used.append(kw["guidance_scale"]) or original(self, prompt, **kw))
    paper = {**models, "cm": str(lcm), "cm_steps": [1]}
    run_evaluation(_config(models, image_folder, tmp_path, methods=["cm-controlnet+cm"], conditions=[{"name": "canny"}], paper=paper), log=None)
    assert used and set(used) == {3.5}  # the folder's ccm_defaults.json
    used.clear()
    paper["cm_guidance_scale"] = 6.0
    run_evaluation(_config(models, image_folder, tmp_path, methods=["cm-controlnet+cm"], conditions=[{"name": "canny"}], paper=paper), log=None)
    assert used and set(used) == {6.0}  # an explicit scale wins
