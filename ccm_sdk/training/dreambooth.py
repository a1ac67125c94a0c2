"""DreamBooth-style customisation of a consistency model with the consistency-training loss
(method doc, section 3, last paragraph).

A few subject images are trained with an identifier prompt ("a photo of sks dog") and the CT loss
of ``ct.py`` on the UNet itself (full, or a LoRA); with prior preservation, class images with the
class prompt ("a photo of a dog") are added to every batch and their loss weighted by
``prior_loss_weight``. Missing class images are generated with the model before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch.utils.data import ConcatDataset, Dataset, Sampler

from ..datasets import IMAGE_EXTENSIONS, RecaptionedDataset, open_dataset
from ..errors import TrainingError
from ..models.conditioning import Conditioning
from ..models.controlled_unet import controlled_unet
from ..pipeline import CCMPipeline
from .batches import JointBatches, StepBatches
from .config import ConsistencyConfig, LoraSection, TrainConfig
from .core import Trainer
from .ct import ConsistencyDraws, Denoise, consistency_loss, consistency_pair, sample_draws
from .export import save_pipeline_with_unet, save_unet_lora
from .frozen import FrozenBase
from .lora import add_unet_lora


class DreamBoothTrainConfig(TrainConfig):
    """DreamBooth-style customisation of a consistency model with the consistency loss."""

    instance_prompt: str = Field(description="prompt with the identifier token, e.g. 'a photo of sks dog'; replaces captions")
    mode: Literal["full", "lora"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    with_prior_preservation: bool = False
    class_prompt: str | None = Field(default=None, description="e.g. 'a photo of a dog'")
    class_data_dir: str | None = Field(default=None, description="class images; missing ones are generated with the model")
    num_class_images: int = Field(default=100, ge=1)
    prior_loss_weight: float = Field(default=1.0, ge=0.0)
    class_image_steps: int = Field(default=4, ge=1, le=8, description="sampling steps used to generate class images")

    @model_validator(mode="after")
    def _prior_inputs(self):
        if self.with_prior_preservation and (not self.class_prompt or not self.class_data_dir):
            raise ValueError("with_prior_preservation needs class_prompt and class_data_dir")
        return self


@dataclass
class DreamBoothInputs:
    latents: torch.Tensor
    embeds: torch.Tensor | Conditioning  # SDXL: with the pooled embeddings and time ids
    num_instance: int  # the first rows are subject images, the rest class images


class DreamBoothTrainer(Trainer):
    """Customises a consistency model on a few subject images (full UNet or LoRA)."""

    name = "dreambooth"
    description = "DreamBooth-style customisation of a consistency model (full UNet or LoRA)"
    config_class = DreamBoothTrainConfig

    def build(self) -> torch.nn.Module:
        cfg = self.config
        self.pipe = CCMPipeline.from_pretrained(cfg.model)
        self.pipe.set_progress_bar_config(disable=True)
        self.base = FrozenBase(self.pipe, device=self.device, weight_dtype=self.weight_dtype)
        unet = self.pipe.unet
        if cfg.mode == "lora":
            add_unet_lora(unet, cfg.lora)
        else:
            unet.requires_grad_(True)
        self.enable_gradient_checkpointing(unet)
        return unet

    def validation_rows(self, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        images = self.sample_images(self.pipe, batch, consistency=True, guidance_scale=self.config.consistency.w + 1.0)
        return [("generated", images), ("data", batch["images"])]

    # --- data: subject images (+ class images) ------------------------------------------

    def build_dataset(self) -> Dataset:
        cfg = self.config
        if self.user_dataset is not None:
            instance: Dataset = super().build_dataset()
        elif cfg.data.path is None:
            raise TrainingError("no subject images: set data.path to a folder of them, or data.dataset to a registered dataset")
        else:  # captions are replaced by the instance prompt, so images need none
            instance = open_dataset(cfg.data.path, resolution=cfg.data.resolution, default_caption=cfg.instance_prompt)
        instance = RecaptionedDataset(instance, cfg.instance_prompt)
        self.num_instance_images = len(instance)
        if not cfg.with_prior_preservation:
            return instance
        size = tuple(instance[0]["image"].shape[-2:])
        class_dir = self.prepare_class_images(Path(cfg.class_data_dir), size)
        classes = open_dataset(class_dir, resolution=cfg.data.resolution, default_caption=cfg.class_prompt)
        classes = RecaptionedDataset(classes, cfg.class_prompt)
        return ConcatDataset([instance, classes])

    def prepare_class_images(self, folder: Path, size: tuple[int, int]) -> Path:
        """Generate the class images that ``folder`` lacks (main process; the others wait)."""
        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            have = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            with torch.no_grad(), acc.autocast():
                for i in range(have, cfg.num_class_images):
                    generator = torch.Generator(self.device).manual_seed(cfg.train.seed * 100_003 + i)
                    image = self.pipe(
                        cfg.class_prompt, num_inference_steps=cfg.class_image_steps, height=size[0], width=size[1], generator=generator
                    ).images[0]
                    image.save(folder / f"class-{i:05d}.png")
                    (folder / f"class-{i:05d}.txt").write_text(cfg.class_prompt)
        acc.wait_for_everyone()
        return folder

    def batch_sampler(self, dataset: Dataset, start: int, stop: int) -> Sampler:
        if not self.config.with_prior_preservation:
            return super().batch_sampler(dataset, start, stop)
        acc, t = self.accelerator, self.config.train
        common = dict(rank=acc.process_index, world_size=acc.num_processes, start=start, stop=stop)
        n = self.num_instance_images
        return JointBatches(
            StepBatches(n, t.batch_size, seed=t.seed, **common),
            StepBatches(len(dataset) - n, t.batch_size, seed=t.seed + 1, offset=n, **common),
        )

    # --- loss ---------------------------------------------------------------------------

    def prepare_inputs(self, batch: dict[str, Any]) -> DreamBoothInputs:
        num = len(batch["captions"])
        num_instance = num // 2 if self.config.with_prior_preservation else num
        return DreamBoothInputs(
            latents=self.base.encode_batch(batch),
            embeds=self.base.conditioning(batch, dropout=self.config.data.caption_dropout),
            num_instance=num_instance,
        )

    def sample_draws(self, inputs: DreamBoothInputs) -> ConsistencyDraws:
        return sample_draws(inputs.latents, self.config.consistency, self.base.schedule)

    def denoiser(self, unet: torch.nn.Module, inputs: DreamBoothInputs, timestep_cond: torch.Tensor | None) -> Denoise:
        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return controlled_unet(unet, x, t, inputs.embeds, timestep_cond=timestep_cond)

        return denoise

    def compute_loss(self, inputs: DreamBoothInputs, draws: ConsistencyDraws) -> torch.Tensor:
        cfg = self.config
        timestep_cond = self.base.guidance_cond(self.unwrapped(), draws.w)
        online = self.denoiser(self.model, inputs, timestep_cond)
        target = self.denoiser(self.unwrapped(), inputs, timestep_cond)
        f_online, f_target = consistency_pair(online, target, self.base.schedule, inputs.latents, draws, cfg.consistency)
        k = inputs.num_instance
        schedule, instance, prior = self.base.schedule, slice(None, k), slice(k, None)
        loss = consistency_loss(f_online[instance], f_target[instance], draws.rows(instance), schedule, cfg.consistency)
        if k < f_online.shape[0]:
            prior_loss = consistency_loss(f_online[prior], f_target[prior], draws.rows(prior), schedule, cfg.consistency)
            loss = loss + cfg.prior_loss_weight * prior_loss
        return loss

    def save_outputs(self, output_dir: Path) -> dict[str, Path]:
        if self.config.mode == "lora":
            return {"lora": save_unet_lora(self.unwrapped(), output_dir / "lora")}
        return {"model": save_pipeline_with_unet(self.config.model, self.unwrapped(), output_dir / "model")}
