"""The text-to-image trainer: the loss by hand (plain and min-SNR), caption dropout, gradients, EMA,
learning, the exported model folder (CCMPipeline, lcd teacher, dm_controlnet base), exact resume
through ``ccm train``, where the parts come from, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from ccm_sdk.cli import main
from ccm_sdk.datasets import collate
from ccm_sdk.errors import ImageSizeError, IncompatibleModelsError, InputError, TrainingError
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.schedule import NoiseSchedule
from ccm_sdk.training.config import dump_config, resolve_key, validate_config
from ccm_sdk.training.dm_controlnet import DiffusionDraws, DMControlNetTrainer, diffusion_target
from ccm_sdk.training.lcd import LCDTrainer
from ccm_sdk.training.t2i import NoiseScheduleSection, T2ITrainConfig, T2ITrainer, min_snr_weights, scheduler_config
from ccm_sdk.training.text_encoder import build_text_encoder
from ccm_sdk.utils.config_files import set_path

WORDS = ["a", "red", "green", "blue", "yellow", "square"]
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return build_text_encoder(WORDS, tmp_path_factory.mktemp("text") / "words", hidden_size=32, layers=1, max_length=8)


def _config(output_dir, squares, sd_dir, text_dir, **overrides) -> T2ITrainConfig:
    raw = {
        "trainer": "t2i",
        "output_dir": str(output_dir),
        "vae": str(sd_dir),  # the tiny model folder supplies its 8x VAE
        "text_encoder": str(text_dir),
        "architecture": dict(TINY_UNET),
        "data": {"path": str(squares)},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "num_threads": 1, "device": "cpu"},
        "checkpoint": {"every": 2, "keep_last": 2},
        "log": {"progress": False, "plot": False},
    }
    for key, value in overrides.items():
        set_path(raw, resolve_key(T2ITrainConfig, key.replace("__", ".")), value)
    return validate_config(T2ITrainConfig, raw)


@pytest.fixture()
def t2i_config(tmp_path, squares, sd_dir, text_dir):
    """``t2i_config(**overrides)`` (dotted keys written with ``__``): a tiny new UNet on the tiny VAE and the word encoder."""

    def make(output_dir=tmp_path / "out-t2i", **overrides):
        return _config(output_dir, squares, sd_dir, text_dir, **overrides)

    return make


@pytest.fixture()
def trainer(t2i_config):
    trainer = T2ITrainer(t2i_config(ema_decay=0.9))
    trainer.setup()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, squares, sd_dir, text_dir):
    """One short run (EMA, min-SNR, caption dropout) shared by the output tests: (trainer, result, loss before, after)."""
    config = _config(tmp_path_factory.mktemp("t2i") / "run", squares, sd_dir, text_dir, ema_decay=0.9, min_snr_gamma=5.0,
                     data__caption_dropout=0.1, train__max_steps=40, checkpoint__every=100, log__plot=True)  # fmt: skip
    trainer = T2ITrainer(config)
    trainer.setup()
    torch.manual_seed(123)
    inputs = [trainer.prepare_inputs(collate([trainer.dataset[2 * j], trainer.dataset[2 * j + 1]])) for j in range(4)]
    draws = [[trainer.sample_draws(x) for _ in range(3)] for x in inputs]

    def evaluate() -> float:
        with torch.no_grad():
            return sum(trainer.compute_loss(x, d).item() for x, ds in zip(inputs, draws) for d in ds) / 12

    before = evaluate()
    result = trainer.train()
    return trainer, result, before, evaluate()


def _draws(latents):
    return DiffusionDraws(t=torch.tensor([10, 700]), noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)))


def test_loss_matches_the_hand_computed_value(trainer, fixed_batches, by_hand):
    _, (inputs,) = fixed_batches(trainer)
    draws = _draws(inputs.latents)
    with torch.no_grad():
        x = by_hand.add_noise(inputs.latents, draws.noise, draws.t)
        eps = trainer.unwrapped()(x, draws.t, encoder_hidden_states=inputs.embeds).sample
        per_sample = ((eps - draws.noise) ** 2).mean(dim=(1, 2, 3))
        snr = by_hand.alphas[draws.t] / (1 - by_hand.alphas[draws.t])
    assert trainer.compute_loss(inputs, draws).item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    trainer.config = trainer.config.model_copy(update={"min_snr_gamma": 5.0})
    weighted = (torch.clamp(snr, max=5.0) / snr * per_sample).mean()
    assert snr[0] > 5 > snr[1] and trainer.compute_loss(inputs, draws).item() == pytest.approx(weighted.item(), rel=1e-5)


def test_min_snr_weights_for_v_prediction(by_hand):
    t = torch.tensor([0, 100, 999])
    snr = by_hand.alphas[t] / (1 - by_hand.alphas[t])
    v = NoiseSchedule.from_scheduler_config(scheduler_config(NoiseScheduleSection(prediction_type="v_prediction")))
    assert torch.allclose(min_snr_weights(v, t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-6)


def test_caption_dropout_trains_on_the_empty_prompt(t2i_config):
    trainer = T2ITrainer(t2i_config(data__caption_dropout=0.5))
    trainer.setup()
    batch = collate([trainer.dataset[i] for i in range(8)])
    cond, empty = trainer.base.encode_text(batch["captions"]), trainer.base.encode_text([""] * 8)
    dropped = []
    for seed in range(4):
        torch.manual_seed(seed)
        embeds = trainer.prepare_inputs(batch).embeds
        for row in range(8):
            is_cond, is_empty = torch.equal(embeds[row], cond[row]), torch.equal(embeds[row], empty[row])
            assert is_cond != is_empty
            dropped.append(is_empty)
    assert 0 < sum(dropped) < len(dropped)


def test_only_the_unet_gets_gradients(trainer, fixed_batches, assert_gradients):
    _, (inputs,) = fixed_batches(trainer)
    trainer.compute_loss(inputs, _draws(inputs.latents)).backward()
    pipe = trainer.base.pipe
    assert_gradients(trainer.unwrapped(), [pipe.vae, pipe.text_encoder, trainer.ema])
    assert pipe.unet is trainer.unwrapped()


def test_ema_update_with_warmup(trainer):
    online = trainer.unwrapped().conv_in.weight
    with torch.no_grad():
        online.add_(1.0)
    before = trainer.ema.conv_in.weight.clone()
    trainer.after_optimizer_step()  # decay min(0.9, 1/10)
    first = trainer.ema.conv_in.weight.clone()
    assert torch.allclose(first, 0.1 * before + 0.9 * online)
    trainer.after_optimizer_step()  # decay min(0.9, 2/11)
    assert torch.allclose(trainer.ema.conv_in.weight, 2 / 11 * first + 9 / 11 * online)
    trainer.ema_updates = 1000
    assert trainer.ema_decay_now() == 0.9


def test_training_lowers_the_loss(trained):
    _, result, before, after = trained
    assert after < 0.7 * before
    assert len(result.history) == 40 and (result.output_dir / "loss.png").is_file() and (result.output_dir / "loss.csv").is_file()


def test_the_output_loads_with_the_ema_weights_and_generates(trained, sd_dir, text_dir):
    trainer, result, _, _ = trained
    folder = result.outputs["model"]
    pipe = CCMPipeline.from_pretrained(folder)
    assert not pipe.is_lcm and pipe.schedule.prediction_type == "epsilon" and pipe.schedule.num_train_timesteps == 1000
    ema, online = trainer.ema.state_dict(), trainer.unwrapped().state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())
    assert not all(torch.equal(v, online[k]) for k, v in pipe.unet.state_dict().items())
    words = load_file(str(text_dir / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(v, words[k]) for k, v in pipe.text_encoder.state_dict().items() if k in words)
    assert pipe.tokenizer.tokenize("a red square") == ["a</w>", "red</w>", "square</w>"]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    index = json.loads((folder / "model_index.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["beta_schedule"] == "scaled_linear"
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red square", sampler="ddim", num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_the_output_is_an_lcd_teacher_and_a_dm_controlnet_base(trained, make_config, tmp_path):
    folder = str(trained[1].outputs["model"])
    lcd = LCDTrainer(make_config("lcd", model=folder, train__max_steps=2, output_dir=str(tmp_path / "lcd"))).train()
    lcm = CCMPipeline.from_pretrained(lcd.outputs["lcm"])
    lcm.set_progress_bar_config(disable=True)
    assert lcm.is_lcm and torch.isfinite(lcm("a blue square", num_inference_steps=2, height=32, width=32, output_type="pt").images).all()
    config = make_config("dm_controlnet", model=folder, train__max_steps=1, output_dir=str(tmp_path / "cn"))
    controlnet = DMControlNetTrainer(config).train()
    assert CCMPipeline.from_pretrained(folder, controlnet=controlnet.outputs["controlnet"]).controlnets


def test_cli_resume_is_exact_with_ema(t2i_config, tmp_path):
    reference = T2ITrainer(t2i_config(output_dir=str(tmp_path / "reference"), ema_decay=0.9)).train()
    config_file = dump_config(t2i_config(output_dir=str(tmp_path / "resumed"), ema_decay=0.9), tmp_path / "t2i.yaml")
    assert main(["train", "t2i", "--config", str(config_file), "--max_steps", "2"]) == 0
    assert main(["train", "t2i", "--config", str(config_file), "--resume"]) == 0
    name = "unet/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(str(tmp_path / "resumed" / "model" / name)), load_file(str(reference.outputs["model"] / name))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "resumed" / "loss.csv").read_text() == (reference.output_dir / "loss.csv").read_text()


def test_parts_from_a_model_folder(t2i_config, sd_dir, lcm_dir, tmp_path):
    # model alone supplies the VAE, text encoder, initial UNet and scheduler
    trainer = T2ITrainer(t2i_config(model=str(sd_dir), vae=None, text_encoder=None, architecture=None))
    trainer.setup()
    base = CCMPipeline.from_pretrained(sd_dir)
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in trainer.unwrapped().state_dict().items())
    assert trainer.base.pipe.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    assert trainer.base.schedule.scheduler_config == base.schedule.scheduler_config
    # a scheduler section replaces the model's
    trainer = T2ITrainer(t2i_config(unet=str(sd_dir), architecture=None, scheduler={"prediction_type": "v_prediction"}))
    trainer.setup()
    assert trainer.base.schedule.prediction_type == "v_prediction"
    with pytest.raises(IncompatibleModelsError, match="guidance embedding"):
        T2ITrainer(t2i_config(unet=str(lcm_dir), architecture=None)).setup()
    wide = build_text_encoder(WORDS, tmp_path / "wide", hidden_size=48, layers=1, max_length=8)
    with pytest.raises(IncompatibleModelsError, match="hidden size 48 does not match the UNet's cross_attention_dim 32"):
        T2ITrainer(t2i_config(model=str(sd_dir), text_encoder=str(wide), architecture=None)).setup()


ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def test_zero_terminal_snr_teacher(t2i_config, make_config, tmp_path):
    config = t2i_config(scheduler=dict(ZERO_SNR), train__max_steps=2)
    trainer = T2ITrainer(config)
    trainer.setup()
    schedule = trainer.base.schedule
    assert schedule.alpha(999).item() == 0.0 and schedule.alpha(998).item() > 0.0
    latents = torch.randn(2, 4, 4, 4)
    noise = torch.randn_like(latents)
    t = torch.tensor([999, 999])
    # no trace of the image at the last timestep: the input is the noise, the v target is -x0
    assert torch.equal(schedule.add_noise(latents, noise, t), noise)
    assert torch.allclose(diffusion_target(schedule, latents, noise, t), -latents)
    result = trainer.train()
    assert len(result.history) == 2 and all(math.isfinite(loss) for _, loss, _ in result.history)
    written = json.loads((result.outputs["model"] / "scheduler" / "scheduler_config.json").read_text())
    assert {k: written[k] for k in ZERO_SNR} == ZERO_SNR
    pipe = CCMPipeline.from_pretrained(result.outputs["model"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.schedule.alpha(999).item() == 0.0
    assert pipe.schedule.scheduler_timesteps(DDIMScheduler, 4)[0] == 999  # trailing: sampling starts from pure noise
    images = pipe("a red square", sampler="ddim", num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="pt").images
    assert torch.isfinite(images).all()
    # the LCM distilled from it keeps the schedule and samples one step from t = 999
    lcd = LCDTrainer(make_config("lcd", model=str(result.outputs["model"]), train__max_steps=2, output_dir=str(tmp_path / "lcd"))).train()
    lcm = CCMPipeline.from_pretrained(lcd.outputs["lcm"])
    lcm.set_progress_bar_config(disable=True)
    assert lcm.schedule.alpha(999).item() == 0.0 and lcm.schedule.lcm_timesteps(1).tolist() == [999]
    assert torch.isfinite(lcm("a red square", num_inference_steps=1, height=32, width=32, output_type="pt").images).all()
    with pytest.raises(InputError, match="rescale_betas_zero_snr needs prediction_type 'v_prediction'"):
        t2i_config(scheduler={"rescale_betas_zero_snr": True})


def test_bad_input(t2i_config, tmp_path, make_squares):
    # images without captions
    folder = make_squares(tmp_path / "uncaptioned", count=3)
    (folder / "img0.txt").unlink()
    (folder / "img2.txt").unlink()
    with pytest.raises(TrainingError, match=r"t2i learns from captions, but 2 of 3 images have none: .*img0.png.*data.default_caption"):
        T2ITrainer(t2i_config(data__path=str(folder))).setup()
    T2ITrainer(t2i_config(data__path=str(folder), data__default_caption="a square")).setup()  # the documented fix

    class Bare(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32)

    with pytest.raises(TrainingError, match="should be a dict with 'image' and 'caption'"):
        T2ITrainer(t2i_config(data__path=None), dataset=Bare()).setup()
    # an image size the VAE cannot encode
    odd = make_squares(tmp_path / "odd", count=2, size=36)
    with pytest.raises(ImageSizeError, match="36x36, not multiples of the VAE factor 8"):
        T2ITrainer(t2i_config(data__path=str(odd))).setup()
    # config errors
    raw = t2i_config().model_dump()
    raw["min_snr_gama"] = 5.0
    with pytest.raises(InputError, match=r"unknown key 'min_snr_gama' \(did you mean 'min_snr_gamma'\?\)"):
        T2ITrainer(raw)
    with pytest.raises(InputError, match="no vae, no text_encoder: set them, or model"):
        t2i_config(vae=None, text_encoder=None)
    with pytest.raises(InputError, match="either unet .* or architecture"):
        t2i_config(unet="some/unet")
    with pytest.raises(InputError, match="architecture.*expected 2 up_block_types"):
        t2i_config(architecture__up_block_types=["UpBlock2D"])


def test_validation_samples_come_from_the_ema_unet_with_ddim(t2i_config, monkeypatch):
    from ccm_sdk.training.validation import sample_name

    trainer = T2ITrainer(t2i_config(ema_decay=0.9, train__max_steps=2, validation__interval=2, validation__num_images=2, validation__sample_steps=3))
    calls = []
    original = CCMPipeline.__call__

    def spy(pipe, prompt, *args, **kwargs):
        calls.append((pipe.unet, kwargs["sampler"], kwargs["num_inference_steps"], kwargs["guidance_scale"]))
        return original(pipe, prompt, *args, **kwargs)

    monkeypatch.setattr(CCMPipeline, "__call__", spy)
    result = trainer.train()
    assert calls == [(trainer.ema, "ddim", 3, 7.5)]
    assert (result.output_dir / "samples" / sample_name(2)).is_file()


def test_train_text_encoder_jointly(t2i_config, fixed_batches, assert_gradients, text_dir, tmp_path):
    """train_text_encoder: one loss trains UNet and encoder (the encoder at text_encoder_lr), the EMA
    covers both, and the exported folder holds the EMA encoder, which the pipeline then encodes with."""
    from ccm_sdk.training.t2i import TextToImageModel

    config = t2i_config(output_dir=str(tmp_path / "joint"), ema_decay=0.9, train_text_encoder=True, text_encoder_lr=5e-4,
                        train__max_steps=6)  # fmt: skip
    trainer = T2ITrainer(config)
    trainer.setup()
    model = trainer.unwrapped()
    assert isinstance(model, TextToImageModel) and isinstance(trainer.ema, TextToImageModel)
    # 1. the loss runs the encoder on the (dropped) captions' token ids, with gradients into both parts
    batches, (inputs,) = fixed_batches(trainer)
    assert inputs.embeds is None and inputs.input_ids.shape == (2, 8)
    draws = _draws(inputs.latents)
    with torch.no_grad():
        x_t = trainer.base.schedule.add_noise(inputs.latents, draws.noise, draws.t)
        by_hand = model.unet(x_t, draws.t, encoder_hidden_states=model.text_encoder(inputs.input_ids)[0]).sample
    loss = trainer.compute_loss(inputs, draws)
    target = diffusion_target(trainer.base.schedule, inputs.latents, draws.noise, draws.t)
    assert loss.item() == pytest.approx((by_hand - target).square().mean().item(), rel=1e-5)
    loss.backward()
    assert_gradients(model, [trainer.base.pipe.vae, trainer.ema])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_encoder.parameters())
    # 2. the encoder's group learns at its own rate
    optimizer, _ = trainer.prepare_optimizer()
    rates = sorted(group["lr"] for group in optimizer.param_groups)
    assert rates == [5e-4, 1e-3] and sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    optimizer.zero_grad()
    # 3. a run exports the EMA encoder, and the pipeline encodes prompts with it
    result = T2ITrainer(config.model_copy(update={"output_dir": str(tmp_path / "joint-run")})).train()
    folder = result.outputs["model"]
    saved = load_file(str(folder / "text_encoder" / "model.safetensors"))
    words = load_file(str(text_dir / "text_encoder" / "model.safetensors"))
    changed = [k for k in words if k in saved and not torch.equal(saved[k], words[k])]
    assert changed, "the exported text encoder is the frozen one"
    pipe = CCMPipeline.from_pretrained(folder)
    assert all(torch.equal(v, saved[k]) for k, v in pipe.text_encoder.state_dict().items() if k in saved)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red square", sampler="ddim", num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="pt").images
    assert torch.isfinite(images).all()


def test_cli_resume_is_exact_with_a_trained_text_encoder(t2i_config, tmp_path):
    make = lambda out: t2i_config(output_dir=str(tmp_path / out), ema_decay=0.9, train_text_encoder=True)  # noqa: E731
    reference = T2ITrainer(make("reference")).train()
    config_file = dump_config(make("resumed"), tmp_path / "t2i.yaml")
    assert main(["train", "t2i", "--config", str(config_file), "--max_steps", "2"]) == 0
    assert main(["train", "t2i", "--config", str(config_file), "--resume"]) == 0
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        ours, theirs = load_file(str(tmp_path / "resumed" / "model" / name)), load_file(str(reference.outputs["model"] / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_text_encoder_lr_needs_train_text_encoder(t2i_config):
    with pytest.raises(Exception, match="text_encoder_lr is set but train_text_encoder is false"):
        t2i_config(text_encoder_lr=1e-4)
