"""Training on an SDXL base: the added conditions of a batch match diffusers' SDXL training
scripts, and each trainer that takes SDXL trains a few steps on the tiny SDXL models, saves what
the pipeline loads, and resumes after a kill to bit-identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ccm_sdk.datasets import collate
from ccm_sdk.errors import IncompatibleModelsError
from ccm_sdk.models.conditioning import Conditioning
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.testing.kill import kill_after_checkpoint
from ccm_sdk.training import get_trainer as trainer_class
from ccm_sdk.training.checkpoint import list_checkpoints
from ccm_sdk.training.core import Trainer, weights_digest
from ccm_sdk.training.t2i import T2ITrainer

from .conftest import TINY_CONTROL_EMBEDDING

STEPS = 4  # the kill comes after step 3, the last checkpoint holds step 2


@pytest.fixture(scope="session")
def sdxl_models(sdxl_dir, sdxl_lcm_dir, sdxl_controlnet_dir, sdxl_controlnet_b_dir) -> dict[str, dict]:
    """Per case, the trainer and the config keys that point it at the tiny SDXL models."""
    dreambooth = {"model": str(sdxl_lcm_dir), "instance_prompt": "a photo of sks square", "lora": {"rank": 4}}
    return {
        "dm_controlnet": ("dm_controlnet", {"model": str(sdxl_dir), "conditioning_embedding_out_channels": TINY_CONTROL_EMBEDDING}),
        "ct_controlnet": ("ct_controlnet", {"model": str(sdxl_lcm_dir), "conditioning_embedding_out_channels": TINY_CONTROL_EMBEDDING}),
        "adapter": ("adapter", {
            "model": str(sdxl_lcm_dir),
            "controlnets": [
                {"path": str(sdxl_controlnet_dir), "condition": "canny", "control_key": "control"},
                {"path": str(sdxl_controlnet_b_dir), "condition": "sr", "condition_options": {"factor": 4}},
            ],
        }),  # fmt: skip
        "lcd-full": ("lcd", {"model": str(sdxl_dir), "mode": "full", "time_cond_proj_dim": 32, "w_min": 0.0, "w_max": 2.0}),
        "lcd-lora": ("lcd", {"model": str(sdxl_dir), "mode": "lora", "lora": {"rank": 4}, "w_min": 0.0, "w_max": 2.0}),
        "dreambooth-lora": ("dreambooth", {**dreambooth, "mode": "lora"}),
        "dreambooth-full": ("dreambooth", {**dreambooth, "mode": "full"}),
    }


@pytest.fixture()
def sdxl_config(tmp_path, squares, sdxl_models):
    """``sdxl_config(case, name, **top_level)``: a small valid config of ``case`` on the tiny SDXL models."""
    from ccm_sdk.training.config import config_class, validate_config

    def make(case: str, name: str, **extra):
        trainer, keys = sdxl_models[case]
        raw = {
            "trainer": trainer, "output_dir": str(tmp_path / name), "data": {"path": str(squares)},
            "train": {"max_steps": STEPS, "batch_size": 2, "lr": 1e-3, "num_threads": 1, "device": "cpu"},
            "checkpoint": {"every": 2, "keep_last": 2}, "log": {"progress": False, "plot": False}, **keys, **extra,
        }  # fmt: skip
        if trainer in ("ct_controlnet", "adapter", "dreambooth"):
            raw["consistency"] = {"recipe": "ccm", "num_points": 10}
        return validate_config(config_class(trainer), raw)

    return make


class Killed(BaseException):
    """Stands in for SIGKILL: the loop stops where it is, nothing more is written."""


def _kill_after(monkeypatch, at: int) -> None:
    original = Trainer.training_step

    def step(self, *args, step, **kwargs):
        loss = original(self, *args, step=step, **kwargs)
        if step == at:
            raise Killed
        return loss

    monkeypatch.setattr(Trainer, "training_step", step)


def _weights(output: Path) -> dict[str, torch.Tensor]:
    """Every safetensors file of an output (a file or a folder), keyed by file and tensor name."""
    files = [output] if output.is_file() else sorted(output.rglob("*.safetensors"))
    assert files, f"no weights in {output}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _generate(pipe: CCMPipeline, control=None, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red square", control, num_inference_steps=2, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0), **kwargs).images  # fmt: skip
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    return images


# --- the added conditions ------------------------------------------------------------------


@pytest.fixture()
def base(sdxl_config):
    trainer = trainer_class("dm_controlnet")(sdxl_config("dm_controlnet", "base"))
    trainer.setup()
    return trainer


def test_conditioning_matches_diffusers_sdxl_encoding(base, sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    batch = collate([base.dataset[0], base.dataset[1]])
    cond = base.base.conditioning(batch)
    assert isinstance(cond, Conditioning) and set(cond.added_cond_kwargs) == {"text_embeds", "time_ids"}
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    embeds, _, pooled, _ = reference.encode_prompt(batch["captions"], device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(cond.encoder_hidden_states, embeds, atol=1e-6)
    assert torch.allclose(cond.added_cond_kwargs["text_embeds"], pooled, atol=1e-6)
    # the squares are 32x32 and trained at their size: original = target = (32, 32), no crop
    time_ids = reference._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=torch.float32,
                                           text_encoder_projection_dim=reference.text_encoder_2.config.projection_dim)  # fmt: skip
    assert torch.equal(cond.added_cond_kwargs["time_ids"], time_ids.repeat(2, 1))


def test_time_ids_take_the_datasets_size_and_crop(base, make_squares, tmp_path):
    from ccm_sdk.datasets import open_dataset

    # 48x48 images trained at 32: recorded as (48, 48) before the resize, crop (0, 0) of a square
    wide = open_dataset(make_squares(tmp_path / "big", count=2, size=48), resolution=32)
    batch = collate([wide[0], wide[1]])
    assert batch["original_sizes"].tolist() == [[48, 48]] * 2 and batch["crop_top_lefts"].tolist() == [[0, 0]] * 2
    batch["original_sizes"] = torch.tensor([[40, 64], [64, 40]])
    batch["crop_top_lefts"] = torch.tensor([[0, 12], [12, 0]])
    assert base.base.time_ids(batch).tolist() == [[40, 64, 0, 12, 32, 32], [64, 40, 12, 0, 32, 32]]
    del batch["original_sizes"], batch["crop_top_lefts"]  # not recorded: the training size and no crop
    assert base.base.time_ids(batch).tolist() == [[32, 32, 0, 0, 32, 32]] * 2


def test_lcd_guidance_uses_zeroed_negative_embeddings(sdxl_config):
    trainer = trainer_class("lcd")(sdxl_config("lcd-lora", "zeros"))
    trainer.setup()
    inputs = trainer.prepare_inputs(collate([trainer.dataset[0], trainer.dataset[1]]))
    negative = inputs.uncond_embeds
    assert not negative.encoder_hidden_states.any() and not negative.added_cond_kwargs["text_embeds"].any()
    assert torch.equal(negative.added_cond_kwargs["time_ids"], inputs.embeds.added_cond_kwargs["time_ids"])
    # a negative prompt is encoded, pooled embedding included
    trainer = trainer_class("lcd")(sdxl_config("lcd-lora", "negative", negative_prompt="blurry"))
    trainer.setup()
    negative = trainer.prepare_inputs(collate([trainer.dataset[0], trainer.dataset[1]])).uncond_embeds
    embeds, pooled = trainer.base.encode_prompts(["blurry"] * 2)
    assert torch.equal(negative.encoder_hidden_states, embeds) and torch.equal(negative.added_cond_kwargs["text_embeds"], pooled)


def test_dreambooth_prior_preservation_generates_class_images_with_the_sdxl_model(sdxl_config, tmp_path):
    classes = tmp_path / "classes"
    config = sdxl_config("dreambooth-lora", "prior", with_prior_preservation=True, class_prompt="a photo of a square",
                         class_data_dir=str(classes), num_class_images=2, class_image_steps=1)  # fmt: skip
    trainer = trainer_class("dreambooth")(config)
    trainer.setup()
    assert sorted(p.name for p in classes.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    batch = collate([trainer.dataset[0], trainer.dataset[len(trainer.dataset) - 1]])
    inputs = trainer.prepare_inputs(batch)
    assert inputs.embeds.added_cond_kwargs["time_ids"].shape == (2, 6)
    assert torch.isfinite(trainer.compute_loss(inputs, trainer.sample_draws(inputs)))


def test_t2i_refuses_an_sdxl_model(tmp_path, squares, sdxl_dir):
    from ccm_sdk.training.config import validate_config

    config = validate_config(T2ITrainer.config_class, {
        "trainer": "t2i", "model": str(sdxl_dir), "output_dir": str(tmp_path / "t2i"), "data": {"path": str(squares)},
        "train": {"max_steps": 2, "batch_size": 2, "num_threads": 1, "device": "cpu"},
    })  # fmt: skip
    with pytest.raises(IncompatibleModelsError, match="SDXL.*dm_controlnet, ct_controlnet, adapter, lcd and dreambooth"):
        T2ITrainer(config).setup()


# --- each trainer: a few steps, its outputs load and generate, and an exact resume ------------


def _check_outputs_load(case: str, outputs: dict[str, Path], models: dict[str, Path], control: torch.Tensor) -> None:
    if case in ("dm_controlnet", "ct_controlnet"):
        base = models["sdxl_dir"] if case == "dm_controlnet" else models["sdxl_lcm_dir"]
        pipe = CCMPipeline.from_pretrained(base, controlnet=outputs["controlnet"])
        assert pipe.is_sdxl and pipe.controlnets[0].config.addition_embed_type == "text_time"
        _generate(pipe, control, **({"sampler": "ddim", "guidance_scale": 3.0} if case == "dm_controlnet" else {}))
    elif case == "adapter":
        pipe = CCMPipeline.from_pretrained(models["sdxl_lcm_dir"], controlnet=models["sdxl_controlnet_dir"], adapter=outputs["adapter"])
        _generate(pipe, control)
    elif case == "lcd-full" or case == "dreambooth-full":
        pipe = CCMPipeline.from_pretrained(outputs["lcm" if case == "lcd-full" else "model"])
        assert pipe.is_sdxl and pipe.is_lcm
        _generate(pipe)
    else:  # a LoRA on the model it was trained on
        base = models["sdxl_dir"] if case == "lcd-lora" else models["sdxl_lcm_dir"]
        plain = _generate(CCMPipeline.from_pretrained(base), sampler="consistency")
        tuned = _generate(CCMPipeline.from_pretrained(base, lora=outputs["lora"]), sampler="consistency")
        assert not torch.allclose(plain, tuned)


@pytest.mark.parametrize("case", ["dm_controlnet", "ct_controlnet", "adapter", "lcd-full", "lcd-lora", "dreambooth-lora", "dreambooth-full"])
def test_trains_saves_what_loads_and_resumes_exactly(case, sdxl_config, sdxl_models, monkeypatch, control_image,
                                                     sdxl_dir, sdxl_lcm_dir, sdxl_controlnet_dir):  # fmt: skip
    cls = trainer_class(sdxl_models[case][0])
    # 1. the reference, uninterrupted (with validation samples, which must not touch the training RNG):
    #    finite losses, the weights move, the outputs load and generate
    reference = cls(sdxl_config(case, "reference", validation={"interval": 2, "num_images": 1, "sample_steps": 1}))
    reference.setup()
    before = weights_digest(reference.trainable_state())
    result = reference.train()
    assert len(result.history) == STEPS and all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in result.history)
    assert weights_digest(reference.trainable_state()) != before
    assert sorted(p.name for p in (result.output_dir / "samples").glob("step-*.png")) == ["step-00000002.png", "step-00000004.png"]
    models = {"sdxl_dir": sdxl_dir, "sdxl_lcm_dir": sdxl_lcm_dir, "sdxl_controlnet_dir": sdxl_controlnet_dir}
    _check_outputs_load(case, result.outputs, models, control_image[..., :32, :32])
    # 2. the same run killed after step 3: its last checkpoint holds step 2, and no outputs exist
    with monkeypatch.context() as patch:
        _kill_after(patch, 3)
        with pytest.raises(Killed):
            cls(sdxl_config(case, "killed")).train()
    killed = Path(sdxl_config(case, "killed").output_dir)
    assert [step for step, _ in list_checkpoints(killed / "checkpoints")] == [2]
    assert not any((killed / name).exists() for name in result.outputs)
    # 3. resumed to the end: bit-identical weights and the same loss history
    resumed = cls(sdxl_config(case, "killed", checkpoint={"every": 2, "keep_last": 2, "resume": True})).train()
    for name, path in result.outputs.items():
        ours, theirs = _weights(resumed.outputs[name]), _weights(path)
        assert ours.keys() == theirs.keys()
        different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert not different, f"{len(different)} tensors differ after resuming, e.g. {different[:3]}"
    assert (killed / "loss.csv").read_text() == (result.output_dir / "loss.csv").read_text()


@pytest.mark.slow
def test_sigkill_of_the_command_line_run_then_resume_is_exact(sdxl_config, tmp_path):
    """The same on a real process: ``ccm train ct_controlnet`` on the SDXL LCM, SIGKILLed after a checkpoint."""
    from ccm_sdk.training.config import dump_config

    steps = 12
    train = {"max_steps": steps, "batch_size": 2, "lr": 1e-3, "num_threads": 1, "device": "cpu"}
    reference = trainer_class("ct_controlnet")(sdxl_config("ct_controlnet", "sig-reference", train=train)).train()
    config = sdxl_config("ct_controlnet", "sig-killed", train=train)
    config_file = dump_config(config, tmp_path / "killed.yaml")
    command = [sys.executable, "-m", "ccm_sdk.training", "ct_controlnet", "--config", str(config_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert kill_after_checkpoint(process, Path(config.output_dir) / "checkpoints", step=4) < steps
    assert not (Path(config.output_dir) / "controlnet").exists()
    process = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    ours = _weights(Path(config.output_dir) / "controlnet")
    theirs = _weights(reference.outputs["controlnet"])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
