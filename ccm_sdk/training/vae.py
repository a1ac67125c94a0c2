"""A KL autoencoder (diffusers ``AutoencoderKL``), trained from a config or continued from a pretrained one.

    x in [-1, 1],  q(z|x) = N(mu, sigma^2),  z = mu + sigma * n,  n ~ N(0, I),  x_rec = D(z)
    loss = l1_weight * mean|x_rec - x| + mse_weight * mean (x_rec - x)^2 + kl_weight * KL
    KL   = 0.5 * sum over latent elements (mu^2 + sigma^2 - 1 - log sigma^2), averaged over the batch

The reconstruction terms are means over pixels, the KL is a per-image sum (diffusers'
``DiagonalGaussianDistribution.kl``), so ``kl_weight`` is the small beta of latent-diffusion
autoencoders (1e-6 in Stable Diffusion's). At the end the latent scaling factor is measured as
Stable Diffusion defines it, 1 / std of posterior samples over a seeded subset of the data,
stored as ``scaling_factor`` in the VAE's config, and the VAE is saved with ``save_pretrained``
as ``output_dir/vae/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from ..datasets import TorchDataset, open_dataset
from ..errors import ImageSizeError, InputError, MissingModelError
from ..models.loading import load_component, resolve_model_path
from ..utils.atomic import atomic_folder
from .config import Section, TrainConfig, check_levels
from .core import Trainer


class VAEArchitecture(Section):
    """A new diffusers AutoencoderKL; it downsamples by 2 ** (len(block_out_channels) - 1)."""

    block_out_channels: tuple[int, ...] = Field(default=(64, 128, 128), min_length=1, description="channels per level; 3 levels: a 4x VAE")
    layers_per_block: int = Field(default=2, ge=1)
    latent_channels: int = Field(default=4, ge=1)
    norm_num_groups: int = Field(default=32, ge=1)
    down_block_types: tuple[str, ...] | None = Field(default=None, description="None: DownEncoderBlock2D per level")
    up_block_types: tuple[str, ...] | None = Field(default=None, description="None: UpDecoderBlock2D per level")
    sample_size: int | None = Field(default=None, ge=1, description="image size recorded in the config; None: the training images'")

    @model_validator(mode="after")
    def _consistent(self):
        check_levels(self, self.down_block_types, self.up_block_types)
        return self


class VAETrainConfig(TrainConfig):
    """A KL autoencoder: reconstruction (L1 and/or MSE) + kl_weight * KL, then the latent scaling factor."""

    model: str | None = Field(
        default=None, description="continue this AutoencoderKL (a vae folder, or a model folder holding vae/); None: a new one"
    )
    architecture: VAEArchitecture | None = Field(default=None, description="the new VAE's shape; None: these defaults (not with model)")
    l1_weight: float = Field(default=1.0, ge=0.0, description="weight of the mean |x_rec - x| (images in [-1, 1])")
    mse_weight: float = Field(default=0.0, ge=0.0, description="weight of the mean (x_rec - x)^2")
    kl_weight: float = Field(default=1e-6, ge=0.0, description="beta: weight of KL(q(z|x) || N(0, I)), summed over latent elements")
    scaling_factor: float | None = Field(default=None, gt=0.0, description="store this scaling_factor; None: 1 / std of the latents")
    scaling_samples: int = Field(default=256, ge=2, description="images (seeded random subset) that the scaling factor is measured on")
    crop_size: int | None = Field(
        default=None, ge=1,
        description="train on random square crops of this size (a multiple of the VAE's factor): the autoencoder is "
        "convolutional, so crops teach it the same at a fraction of the cost; validation and the scaling factor use whole images",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_source(self):
        if self.model is not None and self.architecture is not None:
            raise ValueError("set either model (continue a pretrained VAE) or architecture (a new one), not both")
        if self.l1_weight == 0 and self.mse_weight == 0:
            raise ValueError("l1_weight and mse_weight are both 0: nothing trains the reconstruction")
        return self


@dataclass
class VAEInputs:
    images: torch.Tensor  # [B,3,H,W] in [-1, 1]


@dataclass
class VAEDraws:
    noise: torch.Tensor  # [B,C,h,w]: the posterior sample's standard normal noise


class Autoencode(torch.nn.Module):
    """The trainable module: encode, sample the posterior with given noise, decode.

    One ``forward`` so that DDP (which only wraps ``forward``) sees the whole step.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.vae.decode(latents).sample, posterior.mean, posterior.logvar


def vae_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def new_vae(architecture: VAEArchitecture) -> AutoencoderKL:
    """An AutoencoderKL of ``architecture`` with diffusers' initialisation (from the global RNG)."""
    levels = len(architecture.block_out_channels)
    try:
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=architecture.down_block_types or ("DownEncoderBlock2D",) * levels,
            up_block_types=architecture.up_block_types or ("UpDecoderBlock2D",) * levels,
            block_out_channels=architecture.block_out_channels,
            layers_per_block=architecture.layers_per_block,
            latent_channels=architecture.latent_channels,
            norm_num_groups=architecture.norm_num_groups,
            sample_size=architecture.sample_size or 32,
        )
    except ValueError as exc:  # an unknown block type
        raise InputError(f"architecture: diffusers cannot build this AutoencoderKL: {exc}") from None


def load_vae(source: str, *, torch_dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """An AutoencoderKL from a vae folder (config.json + safetensors) or a model folder holding ``vae/``."""
    root = resolve_model_path(source, what="VAE")
    if (root / "vae" / "config.json").is_file():
        root = root / "vae"
    elif not (root / "config.json").is_file():
        raise MissingModelError(f"VAE {source!r}: expected a vae folder (config.json + safetensors) or a model folder holding vae/")
    return load_component(AutoencoderKL, root, what=f"VAE {source!r}", torch_dtype=torch_dtype)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over each sample's latent elements, averaged over the batch."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, dataset: Dataset, *, samples: int, batch_size: int, seed: int,
                          device: torch.device | str = "cpu") -> float:  # fmt: skip
    """1 / std of posterior samples z ~ q(z|x) over ``samples`` images of ``dataset`` (a seeded subset).

    Stable Diffusion's definition: one std over every latent element, so scaled latents have unit variance.
    """
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:samples].tolist()
    chunks = []
    for start in range(0, len(indices), batch_size):
        images = torch.stack([dataset[i]["image"] for i in indices[start : start + batch_size]])
        posterior = vae.encode(images.to(device, torch.float32) * 2 - 1).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        chunks.append((posterior.mean + posterior.std * noise).float().cpu())
    latents = torch.cat(chunks)
    if latents.numel() < 2:
        raise InputError("the scaling factor needs at least two latent values")
    return 1.0 / latents.flatten().std().item()


def random_crops(images: torch.Tensor, size: int) -> torch.Tensor:
    """One random ``size`` x ``size`` crop of each image of ``images`` [B,C,H,W] (offsets from the global RNG)."""
    height, width = images.shape[-2:]
    if size > min(height, width):
        raise ImageSizeError(f"crop_size {size} is larger than the {height}x{width} training images")
    tops = torch.randint(0, height - size + 1, (len(images),)).tolist()
    lefts = torch.randint(0, width - size + 1, (len(images),)).tolist()
    return torch.stack([image[:, t : t + size, l : l + size] for image, t, l in zip(images, tops, lefts)])


class _ImagesOnly(Dataset):
    """A dataset of bare images (or dicts / pairs) for the VAE: captions are optional and unused."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if isinstance(item, dict):
            return {"caption": "", **item}
        if isinstance(item, (tuple, list)):
            return {"image": item[0], "caption": ""}
        return {"image": item, "caption": ""}


class VAETrainer(Trainer):
    """Trains (or continues) an AutoencoderKL; exports it with its measured latent scaling factor."""

    name = "vae"
    description = "a KL autoencoder (AutoencoderKL), new or continued, with its latent scaling factor"
    config_class = VAETrainConfig

    def build(self) -> Autoencode:
        cfg = self.config
        if cfg.model is not None:
            vae = load_vae(cfg.model)
        else:
            vae = new_vae(cfg.architecture or VAEArchitecture())
        vae.requires_grad_(True)
        self.factor = vae_factor(vae)
        self.enable_gradient_checkpointing(vae)
        return Autoencode(vae)

    def build_dataset(self) -> Dataset:
        data = self.config.data
        if self.user_dataset is not None:  # bare images are fine: captions are not used
            return TorchDataset(_ImagesOnly(self.user_dataset), control_key=data.control_key, resolution=data.resolution)
        if data.path is None:
            return super().build_dataset()  # raises: no training data
        return open_dataset(data.path, resolution=data.resolution, default_caption=data.default_caption or "")

    def setup(self) -> None:
        """As the base class, then check the image size against the VAE's factor before any step runs."""
        if self.model is not None:
            return
        super().setup()
        height, width = self.dataset[0]["image"].shape[-2:]
        self.check_size(height, width)
        crop = self.config.crop_size
        if crop is not None and (crop % self.factor or crop > min(height, width)):
            raise ImageSizeError(f"crop_size {crop} must be a multiple of the VAE's factor {self.factor} "
                                 f"and at most the {height}x{width} training images")  # fmt: skip
        vae = self.model.vae
        if self.config.model is None and (self.config.architecture or VAEArchitecture()).sample_size is None:
            vae.register_to_config(sample_size=int(height))

    def check_size(self, height: int, width: int) -> None:
        if height % self.factor or width % self.factor:
            blocks = list(self.model_vae().config.block_out_channels)
            raise ImageSizeError(
                f"training images are {height}x{width}, but this VAE (block_out_channels {blocks}) downsamples by {self.factor}: "
                f"sizes must be multiples of {self.factor}; set data.resolution or change block_out_channels"
            )

    def model_vae(self) -> AutoencoderKL:
        return self.unwrapped().vae

    def prepare_inputs(self, batch: dict[str, Any]) -> VAEInputs:
        images = batch["images"]
        self.check_size(*images.shape[-2:])
        if self.config.crop_size is not None:
            images = random_crops(images, self.config.crop_size)
        return VAEInputs(images=images.to(self.device, torch.float32) * 2 - 1)

    def sample_draws(self, inputs: VAEInputs) -> VAEDraws:
        batch, _, height, width = inputs.images.shape
        channels = self.model_vae().config.latent_channels
        return VAEDraws(noise=torch.randn(batch, channels, height // self.factor, width // self.factor))

    def validation_rows(self, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        vae = self.model_vae()
        images = batch["images"].to(self.device, torch.float32)
        reconstruction = vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample
        return [("image", images), ("reconstruction", (reconstruction.float() + 1) / 2)]

    def compute_loss(self, inputs: VAEInputs, draws: VAEDraws) -> torch.Tensor:
        cfg = self.config
        reconstruction, mean, logvar = self.model(inputs.images, draws.noise.to(self.device))
        error = reconstruction.float() - inputs.images
        loss = cfg.kl_weight * kl_divergence(mean, logvar)
        if cfg.l1_weight:
            loss = loss + cfg.l1_weight * error.abs().mean()
        if cfg.mse_weight:
            loss = loss + cfg.mse_weight * error.square().mean()
        return loss

    def save_outputs(self, output_dir: Path) -> dict[str, Path]:
        cfg = self.config
        vae = self.model_vae().eval()
        scale = cfg.scaling_factor
        if scale is None:
            scale = latent_scaling_factor(
                vae, self.dataset, samples=cfg.scaling_samples, batch_size=cfg.train.batch_size, seed=cfg.train.seed, device=self.device
            )
        self.scaling_factor = float(scale)
        vae.register_to_config(scaling_factor=self.scaling_factor)
        # diffusers' from_config resets keys listed in _use_default_values (scaling_factor among them)
        copy = AutoencoderKL.from_config({k: v for k, v in vae.config.items() if k != "_use_default_values"})
        copy.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in vae.state_dict().items()})
        with atomic_folder(output_dir / "vae") as tmp:
            copy.save_pretrained(tmp, safe_serialization=True)
        return {"vae": output_dir / "vae"}
