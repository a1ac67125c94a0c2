"""Precomputed VAE posteriors in dataset items (``latent_parameters``): the trainers sample from them
instead of encoding the images, with the same result, and reject ones that do not fit."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from ccm_sdk.datasets import collate
from ccm_sdk.errors import ShapeError, TrainingError
from ccm_sdk.training.dm_controlnet import DMControlNetTrainer
from ccm_sdk.training.lcd import LCDTrainer


class WithPosteriors(Dataset):
    """Another dataset's items plus the VAE posterior parameters of each image (or ``parameters``)."""

    def __init__(self, dataset, vae, parameters=None):
        self.dataset, self.vae, self.parameters = dataset, vae, parameters

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        if self.parameters is not None:
            item["latent_parameters"] = self.parameters
        else:
            with torch.no_grad():
                item["latent_parameters"] = self.vae.encode(item["image"][None] * 2 - 1).latent_dist.parameters[0]
        return item


def _trainer(cls, config, dataset=None):
    trainer = cls(config, dataset=dataset)
    trainer.setup()
    return trainer


@pytest.mark.parametrize(("name", "cls"), [("dm_controlnet", DMControlNetTrainer), ("lcd", LCDTrainer)])
def test_precomputed_posteriors_give_the_same_latents(make_config, name, cls):
    plain = _trainer(cls, make_config(name))
    cached = _trainer(cls, make_config(name), dataset=WithPosteriors(plain.dataset, plain.base.pipe.vae))
    items = [plain.dataset[0], plain.dataset[1]]
    batch, cached_batch = collate(items), collate([cached.dataset[0], cached.dataset[1]])
    assert "latent_parameters" not in batch and cached_batch["latent_parameters"].shape[0] == 2
    torch.manual_seed(5)
    expected = plain.base.encode_batch(batch)
    torch.manual_seed(5)
    got = cached.base.encode_batch(cached_batch)
    assert torch.allclose(got, expected, atol=1e-5)
    torch.manual_seed(6)
    assert not torch.allclose(cached.base.encode_batch(cached_batch), got)  # a fresh posterior sample each call
    # a whole short run trains from them
    assert len(cached.train().history) == 4


def test_bad_latent_parameters(make_config):
    plain = _trainer(DMControlNetTrainer, make_config("dm_controlnet"))
    channels = plain.base.pipe.vae.config.latent_channels
    height = plain.dataset[0]["image"].shape[-1] // plain.base.vae_scale_factor
    wrong = _trainer(DMControlNetTrainer, make_config("dm_controlnet"), WithPosteriors(plain.dataset, None, torch.zeros(channels, height, height)))
    with pytest.raises(ShapeError, match=rf"expected latent_parameters of shape \(2, {2 * channels}, {height}, {height}\).*got \(2, {channels}, "):
        wrong.base.encode_batch(collate([wrong.dataset[0], wrong.dataset[1]]))
    nan = torch.full((2 * channels, height, height), float("nan"))
    with pytest.raises(TrainingError, match="latent_parameters of dataset item 0 contain NaN"):
        _trainer(DMControlNetTrainer, make_config("dm_controlnet"), WithPosteriors(plain.dataset, None, nan)).dataset[0]
    with pytest.raises(TrainingError, match=r"should be a float tensor \[2C, h, w\], got torch.int64"):
        _trainer(DMControlNetTrainer, make_config("dm_controlnet"), WithPosteriors(plain.dataset, None, torch.zeros(2, 2, 2, dtype=torch.long))).dataset[0]
    item = plain.dataset[0]
    with pytest.raises(TrainingError, match="1 of 2 items in one batch have no latent_parameters"):
        collate([item, {**item, "latent_parameters": torch.zeros(2 * channels, height, height)}])
