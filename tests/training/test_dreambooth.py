"""DreamBooth with the consistency loss: prior preservation by hand, class images, batches,
gradients for LoRA and full UNet, learning, and outputs that load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ccm_sdk.datasets import collate
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.training.ct import ConsistencyDraws
from ccm_sdk.training.dreambooth import DreamBoothTrainer


@pytest.fixture()
def prior(make_config, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(class_dir / "mine.png")  # one given class image; the rest are generated
    config = make_config("dreambooth", with_prior_preservation=True, class_prompt="a photo of a square",
                         class_data_dir=str(class_dir), num_class_images=3, prior_loss_weight=0.5)  # fmt: skip
    trainer = DreamBoothTrainer(config)
    trainer.setup()
    return trainer


def test_missing_class_images_are_generated(prior):
    folder = prior.config.class_data_dir
    names = sorted(p.name for p in Path(folder).iterdir())
    assert names == ["class-00001.png", "class-00001.txt", "class-00002.png", "class-00002.txt", "mine.png"]
    assert Image.open(f"{folder}/class-00002.png").size == (32, 32)
    assert len(prior.dataset) == 8 + 3


def test_each_batch_holds_subject_then_class_images(prior):
    for indices in prior.batch_sampler(prior.dataset, 0, 3):
        batch = collate([prior.dataset[i] for i in indices])
        assert batch["captions"] == ["a photo of sks square"] * 2 + ["a photo of a square"] * 2


def test_prior_preserving_loss_matches_the_hand_computed_value(prior, by_hand):
    batch = collate([prior.dataset[i] for i in next(iter(prior.batch_sampler(prior.dataset, 0, 1)))])
    torch.manual_seed(0)
    inputs = prior.prepare_inputs(batch)
    assert inputs.num_instance == 2
    noise = torch.randn(inputs.latents.shape, generator=torch.Generator().manual_seed(6))
    draws = ConsistencyDraws(n=torch.tensor([1, 10, 25, 48]), noise=noise, w=torch.full((4,), 7.0), distance="l2")
    grid, emb, unet = by_hand.grid(50), by_hand.w_embedding(draws.w), prior.unwrapped()

    def f(t):
        x = by_hand.add_noise(inputs.latents, draws.noise, t)
        return by_hand.f(unet(x, t, encoder_hidden_states=inputs.embeds, timestep_cond=emb).sample, x, t)

    with torch.no_grad():
        sq = (f(grid[draws.n + 1]) - f(grid[draws.n])).square()
    expected = sq[:2].mean() + 0.5 * sq[2:].mean()
    assert prior.compute_loss(inputs, draws).item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradients(mode, make_config, fixed_batches, assert_gradients):
    trainer = DreamBoothTrainer(make_config("dreambooth", mode=mode))
    trainer.setup()
    _, (inputs,) = fixed_batches(trainer)
    torch.manual_seed(0)
    trainer.compute_loss(inputs, trainer.sample_draws(inputs)).backward()
    unet = trainer.unwrapped()
    lora = [n for n, _ in unet.named_parameters() if "lora_" in n]
    expected = lora if mode == "lora" else [n for n, _ in unet.named_parameters()]
    assert (len(lora) > 0) == (mode == "lora")
    assert_gradients(unet, [trainer.base.pipe.vae, trainer.base.pipe.text_encoder], names=expected)


def test_outputs_load_into_the_pipeline(make_config, lcm_dir):
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    for mode, key in (("lora", "lora"), ("full", "model")):
        trainer = DreamBoothTrainer(make_config("dreambooth", mode=mode, train__max_steps=2, train__lr=1e-2))
        result = trainer.train()
        if mode == "lora":
            pipe = CCMPipeline.from_pretrained(lcm_dir, lora=result.outputs[key])
        else:
            pipe = CCMPipeline.from_pretrained(result.outputs[key])
        with torch.no_grad():
            ours = trainer.unwrapped()(x, 500, encoder_hidden_states=embeds, timestep_cond=cond).sample
            loaded = pipe.unet(x, 500, encoder_hidden_states=embeds, timestep_cond=cond).sample
        assert torch.allclose(ours, loaded, atol=1e-5), mode


@pytest.mark.slow
def test_training_lowers_the_loss(make_config, eval_loss):
    trainer = DreamBoothTrainer(make_config("dreambooth", train__max_steps=150, train__lr=2e-3, checkpoint__every=1000))
    trainer.setup()
    evaluate = eval_loss(trainer)
    before = evaluate()
    trainer.train()
    assert evaluate() < 0.85 * before
