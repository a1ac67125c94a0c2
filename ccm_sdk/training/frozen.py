"""The frozen parts of a text-to-image model that every trainer uses: text encoder, VAE, schedule."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..errors import ImageSizeError, IncompatibleModelsError, ShapeError
from ..pipeline import CCMPipeline
from ..schedule import guidance_embedding


def place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Move ``module``; cast only when the dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if dtype is not None and next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def freeze(*modules: torch.nn.Module) -> None:
    """No gradients and eval mode: frozen weights never reach the optimizer."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()


class FrozenBase:
    """Text encoding, latent encoding and the w-embedding, from a loaded :class:`CCMPipeline`.

    The VAE stays in float32 under mixed precision (some VAEs overflow in float16); the text
    encoder runs in ``weight_dtype``.
    """

    def __init__(self, pipe: CCMPipeline, *, device: torch.device, weight_dtype: torch.dtype):
        if pipe.is_sdxl:
            raise IncompatibleModelsError(
                "training on an SDXL-family base is not supported yet (the trainers compute Stable Diffusion's text conditioning "
                "only); expected a Stable Diffusion 1.x/2.x layout model"
            )
        self.pipe, self.device, self.weight_dtype = pipe, device, weight_dtype
        freeze(pipe.vae, pipe.text_encoder)
        place(pipe.vae, device, torch.float32)
        place(pipe.text_encoder, device, weight_dtype)
        self.schedule = pipe.schedule
        self.vae_scale_factor = pipe.vae_scale_factor
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """CLIP hidden states [B, L, D], padded to the tokenizer's length as the pipeline does."""
        key = tuple(captions)
        if key not in self._text_cache:
            embeds, _ = self.pipe.encode_prompt(list(captions))
            self._text_cache[key] = embeds.to(self.device)
            if len(self._text_cache) > 8:  # repeated prompts (DreamBooth, unconditional) hit; others pass through
                self._text_cache.popitem(last=False)
        return self._text_cache[key]

    def encode_captions(self, captions: Sequence[str], *, dropout: float = 0.0) -> torch.Tensor:
        """:meth:`encode_text` after replacing each caption by "" with probability ``dropout``
        (trains the unconditional branch classifier-free guidance needs)."""
        if dropout > 0:
            keep = torch.rand(len(captions)) >= dropout
            captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        return self.encode_text(captions)

    @torch.no_grad()
    def encode_batch(self, batch: dict) -> torch.Tensor:
        """Scaled latents of a collated batch: sampled from its precomputed ``latent_parameters`` when
        the dataset supplies them (the VAE posterior's ``parameters``, mean and log-variance stacked
        on channels), else from encoding ``images``."""
        parameters = batch.get("latent_parameters")
        if parameters is None:
            return self.encode_images(batch["images"])
        vae = self.pipe.vae
        images = batch["images"]
        factor = self.vae_scale_factor
        expected = (images.shape[0], 2 * vae.config.latent_channels, images.shape[-2] // factor, images.shape[-1] // factor)
        if tuple(parameters.shape) != expected:
            raise ShapeError(
                f"expected latent_parameters of shape {expected} (mean and log-variance of this VAE for "
                f"{images.shape[-2]}x{images.shape[-1]} images), got {tuple(parameters.shape)}"
            )
        return self._scaled_sample(DiagonalGaussianDistribution(parameters.to(self.device, torch.float32)))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> scaled latents, sampled from the VAE posterior (float32)."""
        height, width = images.shape[-2:]
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ImageSizeError(f"training images must be multiples of the VAE factor {factor}, got {height}x{width}; set data.resolution")
        vae = self.pipe.vae
        return self._scaled_sample(vae.encode(images.to(self.device, torch.float32) * 2 - 1).latent_dist)

    def _scaled_sample(self, posterior: DiagonalGaussianDistribution) -> torch.Tensor:
        config = self.pipe.vae.config
        return (posterior.sample() - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    def guidance_cond(self, unet: torch.nn.Module, w: torch.Tensor) -> torch.Tensor | None:
        """The w-embedding a UNet with ``time_cond_proj_dim`` takes as ``timestep_cond``; else None."""
        dim = unet.config.get("time_cond_proj_dim")
        if dim is None:
            return None
        return guidance_embedding(w.float().cpu(), dim).to(self.device, self.weight_dtype)
