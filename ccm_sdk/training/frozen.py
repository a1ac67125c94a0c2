"""The frozen parts of a text-to-image model that every trainer uses: text encoder, VAE, schedule."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..errors import ImageSizeError, ShapeError
from ..models.conditioning import Conditioning
from ..models.sdxl import MicroConditioning
from ..pipeline import CCMPipeline
from ..schedule import guidance_embedding


def place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Move ``module``; cast only when the dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if dtype is not None and next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def drop_captions(captions: Sequence[str], dropout: float) -> list[str]:
    """Each caption replaced by "" with probability ``dropout`` (trains the unconditional branch
    classifier-free guidance needs); draws from the global (checkpointed) RNG only when ``dropout > 0``."""
    if dropout > 0:
        keep = torch.rand(len(captions)) >= dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist())]
    return list(captions)


def freeze(*modules: torch.nn.Module) -> None:
    """No gradients and eval mode: frozen weights never reach the optimizer."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def pipeline_like(pipe: CCMPipeline, *, unet: torch.nn.Module, scheduler_config: dict[str, Any] | None = None,
                  **parts: Any) -> CCMPipeline:  # fmt: skip
    """A pipeline of ``pipe``'s family and text encoders and VAE with another ``unet`` (and the
    ControlNets / adapter in ``parts``): what validation samples from and exports save."""
    family = {}
    if pipe.is_sdxl:
        family = dict(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                      force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt)  # fmt: skip
    parts.setdefault("generation_defaults", pipe.generation_defaults)
    return CCMPipeline(unet=unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                       scheduler_config=scheduler_config or pipe.schedule.scheduler_config, **family, **parts)  # fmt: skip


class FrozenBase:
    """Text encoding, latent encoding and the w-embedding, from a loaded :class:`CCMPipeline`.

    The VAE stays in float32 under mixed precision (some VAEs overflow in float16); the text
    encoder(s) run in ``weight_dtype``. For an SDXL base the text conditioning of a batch is a
    :class:`~ccm_sdk.models.conditioning.Conditioning` with the pooled embedding of
    ``text_encoder_2`` and the size/crop time ids, as diffusers' SDXL training scripts build them
    (:meth:`conditioning`); for Stable Diffusion it is the hidden states tensor.
    """

    def __init__(self, pipe: CCMPipeline, *, device: torch.device, weight_dtype: torch.dtype):
        self.pipe, self.device, self.weight_dtype = pipe, device, weight_dtype
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if pipe.is_sdxl else [])
        freeze(pipe.vae, *encoders)
        place(pipe.vae, device, torch.float32)
        for encoder in encoders:
            place(encoder, device, weight_dtype)
        self.schedule = pipe.schedule
        self.vae_scale_factor = pipe.vae_scale_factor
        self._text_cache: OrderedDict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    @property
    def is_sdxl(self) -> bool:
        return self.pipe.is_sdxl

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [B, L, D], pooled embedding [B, P] or None), encoded as the pipeline encodes
        prompts: for SDXL both encoders' penultimate hidden states and text_encoder_2's projection."""
        key = tuple(captions)
        if key not in self._text_cache:
            embeds, _, pooled, _ = self.pipe._encode_prompts(list(captions), negative_prompt=None, do_cfg=False)
            self._text_cache[key] = (embeds.to(self.device), None if pooled is None else pooled.to(self.device))
            if len(self._text_cache) > 8:  # repeated prompts (DreamBooth, unconditional) hit; others pass through
                self._text_cache.popitem(last=False)
        return self._text_cache[key]

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """CLIP hidden states [B, L, D], padded to the tokenizer's length as the pipeline does."""
        return self.encode_prompts(captions)[0]

    def encode_captions(self, captions: Sequence[str], *, dropout: float = 0.0) -> torch.Tensor:
        """:meth:`encode_text` after :func:`drop_captions` (the hidden states only; see :meth:`conditioning`)."""
        return self.encode_text(drop_captions(captions, dropout))

    def conditioning(
        self, batch: dict[str, Any], *, captions: Sequence[str] | None = None, dropout: float = 0.0
    ) -> torch.Tensor | Conditioning:
        """The UNet's text conditioning of a collated batch (``captions``: instead of the batch's),
        each caption replaced by "" with probability ``dropout``.

        Stable Diffusion: the hidden states. SDXL: a Conditioning whose ``added_cond_kwargs`` hold
        the pooled embeddings and :meth:`time_ids`."""
        captions = drop_captions(batch["captions"] if captions is None else captions, dropout)
        embeds, pooled = self.encode_prompts(captions)
        if not self.is_sdxl:
            return embeds
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": self.time_ids(batch)})

    def negative_conditioning(
        self, batch: dict[str, Any], prompt: str, positive: torch.Tensor | Conditioning
    ) -> torch.Tensor | Conditioning:
        """The unconditional half of classifier-free guidance for ``batch``: ``prompt`` encoded for
        every sample. For SDXL an empty prompt gives zero hidden states and pooled embeddings (the
        pipeline's ``force_zeros_for_empty_prompt``, as diffusers' SDXL pipelines and LCM
        distillation scripts use), with the positive side's time ids."""
        captions = [prompt] * len(batch["captions"])
        if not self.is_sdxl:
            return self.encode_text(captions)
        if prompt == "" and self.pipe.force_zeros_for_empty_prompt:
            added = positive.added_cond_kwargs
            return Conditioning(torch.zeros_like(positive.encoder_hidden_states),
                                {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]})  # fmt: skip
        return self.conditioning(batch, captions=captions)

    def time_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """SDXL's six time ids per sample [B, 6] (``weight_dtype``): original size, crop top-left,
        target size. The original size and crop are the dataset's (``original_sizes`` and
        ``crop_top_lefts`` of a collated batch) where it records them, else the training size and
        (0, 0); the target size is the training size (the batch's images)."""
        images = batch["images"]
        size = (int(images.shape[-2]), int(images.shape[-1]))
        count = images.shape[0]
        originals, crops = batch.get("original_sizes"), batch.get("crop_top_lefts")
        rows = []
        for i in range(count):
            micro = MicroConditioning.coerce({
                "original_size": size if originals is None else tuple(int(v) for v in originals[i]),
                "crops_coords_top_left": (0, 0) if crops is None else tuple(int(v) for v in crops[i]),
                "target_size": size,
            })  # fmt: skip
            rows.append(micro.time_ids(*size)[0])
        return torch.tensor(rows, dtype=self.weight_dtype, device=self.device)

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
