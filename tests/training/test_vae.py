"""The VAE trainer: the loss by hand, gradients, learning, the scaling factor and the exported
folder, exact resume through ``ccm train``, and bad input."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from ccm_sdk.cli import main
from ccm_sdk.errors import ImageSizeError, InputError
from ccm_sdk.training import train
from ccm_sdk.training.config import dump_config, resolve_key, validate_config
from ccm_sdk.training.vae import VAEDraws, VAETrainConfig, VAETrainer, latent_scaling_factor
from ccm_sdk.utils.config_files import set_path

TINY = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8}  # 4x


@pytest.fixture()
def vae_config(tmp_path, squares):
    """``vae_config(**overrides)`` (dotted keys written with ``__``): a 4x VAE on 32x32 squares."""

    def make(**overrides):
        raw = {
            "trainer": "vae",
            "output_dir": str(tmp_path / "out-vae"),
            "architecture": dict(TINY),
            "data": {"path": str(squares)},
            "train": {"max_steps": 4, "batch_size": 2, "lr": 2e-3, "num_threads": 1, "device": "cpu"},
            "checkpoint": {"every": 2, "keep_last": 2},
            "log": {"progress": False, "plot": False},
        }
        for key, value in overrides.items():
            set_path(raw, resolve_key(VAETrainConfig, key.replace("__", ".")), value)
        return validate_config(VAETrainConfig, raw)

    return make


@pytest.fixture()
def trainer(vae_config):
    trainer = VAETrainer(vae_config(l1_weight=1.0, mse_weight=0.5, kl_weight=1e-3))
    trainer.setup()
    return trainer


def _draws(inputs):
    return VAEDraws(noise=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)))


def test_loss_matches_the_hand_computed_value(trainer, fixed_batches):
    batches, (inputs,) = fixed_batches(trainer)
    draws = _draws(inputs)
    vae = trainer.model_vae()
    with torch.no_grad():
        x = batches[0]["images"] * 2 - 1
        posterior = vae.encode(x).latent_dist
        mean, logvar = posterior.mean, posterior.logvar
        reconstruction = vae.decode(mean + torch.exp(0.5 * logvar) * draws.noise).sample
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        assert kl.item() == pytest.approx(posterior.kl().mean().item(), rel=1e-5)  # diffusers' own KL
        expected = (reconstruction - x).abs().mean() + 0.5 * ((reconstruction - x) ** 2).mean() + 1e-3 * kl
        assert trainer.compute_loss(inputs, draws).item() == pytest.approx(expected.item(), rel=1e-5)


def test_every_vae_parameter_gets_a_gradient(trainer, fixed_batches, assert_gradients):
    _, (inputs,) = fixed_batches(trainer)
    trainer.compute_loss(inputs, _draws(inputs)).backward()
    vae = trainer.model_vae()
    assert_gradients(trainer.unwrapped(), [], names=[f"vae.{n}" for n, _ in vae.named_parameters()])
    assert vae.encoder.conv_out.weight.grad.abs().sum() > 0 and vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_training_lowers_the_loss_and_exports_the_vae_with_its_scaling_factor(vae_config, eval_loss):
    config = vae_config(train__max_steps=40, checkpoint__every=100, log__plot=True, scaling_samples=8)
    trainer = VAETrainer(config)
    trainer.setup()
    evaluate = eval_loss(trainer)
    before = evaluate()
    result = trainer.train()
    assert evaluate() < 0.6 * before
    # the folder loads with diffusers and holds the trained weights
    folder = result.outputs["vae"]
    loaded = AutoencoderKL.from_pretrained(folder)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trainer.model_vae().state_dict().items())
    assert loaded.config.sample_size == 32 and list(loaded.config.block_out_channels) == [8, 16, 16]
    # scaling_factor = 1 / std of posterior samples; by the law of total variance, from the posteriors' moments
    factor = loaded.config.scaling_factor
    assert factor == trainer.scaling_factor != 0.18215
    images = torch.stack([trainer.dataset[i]["image"] for i in range(8)]) * 2 - 1
    with torch.no_grad():
        posterior = loaded.encode(images).latent_dist
    mean, var = posterior.mean, posterior.var
    std = ((mean - mean.mean()).square().mean() + var.mean()).sqrt()
    assert factor == pytest.approx(1 / std.item(), rel=0.05)
    assert factor == pytest.approx(latent_scaling_factor(loaded, trainer.dataset, samples=8, batch_size=2, seed=0), rel=1e-6)
    # loss curve and summary
    out = result.output_dir
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in csv.DictReader(open(out / "loss.csv"))] == [str(s) for s in range(1, 41)]


def test_cli_resume_is_exact(vae_config, tmp_path):
    reference = train(vae_config(output_dir=str(tmp_path / "reference"), scaling_factor=0.5))
    config_file = dump_config(vae_config(output_dir=str(tmp_path / "resumed"), scaling_factor=0.5), tmp_path / "vae.yaml")
    assert main(["train", "vae", "--config", str(config_file), "--max_steps", "2"]) == 0
    assert main(["train", "vae", "--config", str(config_file), "--resume"]) == 0
    ours = load_file(str(tmp_path / "resumed" / "vae" / "diffusion_pytorch_model.safetensors"))
    theirs = load_file(str(reference.outputs["vae"] / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "resumed" / "loss.csv").read_text() == (reference.output_dir / "loss.csv").read_text()
    assert AutoencoderKL.from_pretrained(tmp_path / "resumed" / "vae").config.scaling_factor == 0.5


def test_continue_a_pretrained_vae_and_a_dataset_of_bare_images(vae_config, sd_dir, tmp_path):
    class Bare(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3, 32, 32), i / 4)

    config = vae_config(architecture=None, model=str(sd_dir), data__path=None, train__max_steps=1, scaling_factor=0.3)
    trainer = VAETrainer(config, dataset=Bare())
    trainer.setup()
    pretrained = AutoencoderKL.from_pretrained(sd_dir / "vae").state_dict()
    assert all(torch.equal(v, pretrained[k]) for k, v in trainer.model_vae().state_dict().items())
    assert trainer.train().step == 1


def test_bad_input(vae_config, tmp_path):
    # images that the VAE's factor does not divide
    folder = tmp_path / "odd"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(folder / f"img{i}.png")
    with pytest.raises(ImageSizeError, match=r"30x30.*downsamples by 4.*multiples of 4.*data.resolution"):
        VAETrainer(vae_config(data__path=str(folder))).setup()
    assert VAETrainer(vae_config(data__path=str(folder), data__resolution=32)).train().step == 4  # the documented fix
    # config errors
    raw = vae_config().model_dump()
    raw["architecture"]["latent_channel"] = 8
    with pytest.raises(InputError, match=r"unknown key 'architecture.latent_channel' \(did you mean 'latent_channels'\?\)"):
        VAETrainer(raw)
    with pytest.raises(InputError, match="either model .* or architecture"):
        vae_config(model="some/vae")
    with pytest.raises(InputError, match="nothing trains the reconstruction"):
        vae_config(l1_weight=0.0)
    with pytest.raises(InputError, match="expected 3 down_block_types"):
        vae_config(architecture__down_block_types=["DownEncoderBlock2D"])
    with pytest.raises(InputError, match="not divisible by norm_num_groups 8"):
        vae_config(architecture__block_out_channels=[8, 12])


def test_validation_grid_shows_images_over_their_reconstructions(vae_config):
    from ccm_sdk.training.validation import MIN_CELL, sample_name

    result = VAETrainer(vae_config(train__max_steps=2, validation__interval=2, validation__num_images=3)).train()
    grid = Image.open(result.output_dir / "samples" / sample_name(2)).convert("RGB")
    assert grid.height == 14 + 2 * (MIN_CELL + 2) + 2
    # the top row is the data itself: the first square image's dark background (30/255) shows in its corner
    left = 8 + 7 * len("reconstruction") + 2
    assert grid.getpixel((left + 3, 14 + 2 + 3)) == (30, 30, 30)


def test_crop_size_trains_on_random_crops_of_each_image(vae_config, fixed_batches, monkeypatch):
    from ccm_sdk.training import vae as vae_module

    trainer = VAETrainer(vae_config(crop_size=16))
    trainer.setup()
    batches, (inputs,) = fixed_batches(trainer)
    assert inputs.images.shape == (2, 3, 16, 16)
    assert trainer.sample_draws(inputs).noise.shape == (2, 4, 4, 4)  # the crop's latent, not the image's
    # each crop is a window of its own image, at offsets drawn from the global RNG
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    torch.manual_seed(5)
    crops = vae_module.random_crops(images, 16)
    torch.manual_seed(5)
    tops, lefts = torch.randint(0, 17, (2,)).tolist(), torch.randint(0, 17, (2,)).tolist()
    for i in range(2):
        assert torch.equal(crops[i], images[i, :, tops[i] : tops[i] + 16, lefts[i] : lefts[i] + 16])
    assert not torch.equal(crops, vae_module.random_crops(images, 16))  # fresh offsets each call
    # a crop run trains, resumes and exports a VAE that still works on whole images
    result = train(vae_config(crop_size=16, scaling_factor=0.5))
    loaded = AutoencoderKL.from_pretrained(result.outputs["vae"])
    assert loaded.decode(loaded.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()).sample.shape == (1, 3, 32, 32)


def test_crop_size_must_fit_the_vae_and_the_images(vae_config):
    with pytest.raises(ImageSizeError, match=r"crop_size 10 must be a multiple of the VAE's factor 4 and at most the 32x32"):
        VAETrainer(vae_config(crop_size=10)).setup()
    with pytest.raises(ImageSizeError, match=r"crop_size 36 must be a multiple .* at most the 32x32"):
        VAETrainer(vae_config(crop_size=36)).setup()


def test_data_dataset_reads_a_registered_dataset(vae_config):
    import types

    import ccm_sdk
    from ccm_sdk import plugins

    images = [torch.full((3, 16, 16), level) for level in (0.2, 0.5, 0.8)]  # bare images: the VAE needs no captions
    plugin = types.ModuleType("greys")
    plugin.register_datasets = ccm_sdk.hookimpl(lambda register: register(lambda count: images[:count], name="test-vae-greys"))
    plugins.load_plugins()
    plugins.pm.register(plugin, name="greys-plugin")
    try:
        trainer = VAETrainer(vae_config(data__path=None, data__dataset={"name": "test-vae-greys", "options": {"count": 2}}))
        trainer.setup()
        assert len(trainer.dataset) == 2
        torch.testing.assert_close(trainer.dataset[1]["image"], images[1])
    finally:
        plugins.pm.unregister(name="greys-plugin")
