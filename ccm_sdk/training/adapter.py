"""The unified adapter, trained with the consistency-training loss over K frozen ControlNets
(method doc, section 3.3).

Each step draws one condition k ~ U{1..K} for the batch; ControlNet k (a DM ControlNet, frozen)
runs without gradients, the adapter transforms its residuals, and the frozen consistency model
consumes them, through the same ``models.controlled_unet`` as inference. Only the adapter trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from ..models.adapter import UnifiedAdapter
from ..models.conditioning import Conditioning
from ..models.controlled_unet import Control, controlled_unet
from ..models.controlnet import check_controlnet_fits
from ..pipeline import CCMPipeline, load_controlnet
from ..utils.atomic import atomic_folder
from .config import ConsistencyConfig, Section, TrainConfig
from .controls import ControlSource, check_condition_fits
from .core import Trainer
from .ct import ConsistencyDraws, Denoise, consistency_loss, consistency_pair, sample_draws
from .frozen import FrozenBase, freeze, pipeline_like, place


class ControlNetSpec(Section):
    """One frozen ControlNet of the unified adapter's training set."""

    path: str = Field(description="ControlNet folder or hub id")
    condition: str
    condition_options: dict[str, Any] = Field(default_factory=dict)
    control_key: str | None = Field(default=None, description="precomputed maps under this key; None: the condition's name")


class AdapterSection(Section):
    hidden_ratio: float = Field(default=1.0, gt=0.0)
    kernel_size: int = Field(default=3, ge=1)
    activation: Literal["silu", "gelu", "relu"] = "silu"
    init: str | None = Field(default=None, description="start from this adapter folder instead of the identity")


class AdapterTrainConfig(TrainConfig):
    """The unified adapter, by consistency training over K frozen DM ControlNets."""

    controlnets: list[ControlNetSpec] = Field(min_length=1)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)


@dataclass
class AdapterInputs:
    latents: torch.Tensor
    embeds: torch.Tensor | Conditioning  # SDXL: with the pooled embeddings and time ids
    batch: dict[str, Any]  # control maps are made once the step's condition is drawn


@dataclass
class AdapterDraws:
    consistency: ConsistencyDraws
    k: int  # which ControlNet / condition this step uses


class AdapterTrainer(Trainer):
    """Trains a :class:`UnifiedAdapter` shared by K frozen ControlNets."""

    name = "adapter"
    description = "the unified adapter: consistency training over K frozen DM ControlNets"
    config_class = AdapterTrainConfig

    def build(self) -> UnifiedAdapter:
        cfg = self.config
        # 1. the frozen consistency model
        pipe = CCMPipeline.from_pretrained(cfg.model)
        self.base = FrozenBase(pipe, device=self.device, weight_dtype=self.weight_dtype)
        self.unet = pipe.unet
        freeze(self.unet)
        place(self.unet, self.device, self.weight_dtype)
        # 2. the K frozen ControlNets and their conditions
        self.sources, self.controlnets = [], []
        for i, spec in enumerate(cfg.controlnets):
            source = ControlSource(spec.condition, key=spec.control_key or spec.condition, options=spec.condition_options)
            controlnet = load_controlnet(spec.path)
            label = f"controlnets[{i}] ({spec.path!r})"
            check_controlnet_fits(self.unet, controlnet, vae_scale_factor=pipe.vae_scale_factor, label=label)
            check_condition_fits(controlnet, source, label=label)
            freeze(controlnet)
            self.sources.append(source)
            self.controlnets.append(place(controlnet, self.device, self.weight_dtype))
        # 3. the adapter: the identity at first, or a given one
        a = cfg.adapter
        if a.init is not None:
            adapter = UnifiedAdapter.from_pretrained(a.init)
        else:
            adapter = UnifiedAdapter.for_controlnet(
                self.controlnets[0], hidden_ratio=a.hidden_ratio, kernel_size=a.kernel_size, activation=a.activation
            )
        for controlnet in self.controlnets:
            adapter.check_compatible(controlnet)
        self.enable_gradient_checkpointing(self.unet)
        return adapter.float().requires_grad_(True)

    def control_keys(self) -> list[str]:
        return [spec.control_key or spec.condition for spec in self.config.controlnets]

    def prepare_inputs(self, batch: dict[str, Any]) -> AdapterInputs:
        return AdapterInputs(
            latents=self.base.encode_batch(batch),
            embeds=self.base.conditioning(batch, dropout=self.config.data.caption_dropout),
            batch=batch,
        )

    def sample_draws(self, inputs: AdapterInputs) -> AdapterDraws:
        draws = sample_draws(inputs.latents, self.config.consistency, self.base.schedule)
        return AdapterDraws(consistency=draws, k=int(torch.randint(len(self.controlnets), ())))

    def denoiser(self, adapter: torch.nn.Module, k: int, inputs: AdapterInputs, control: torch.Tensor, timestep_cond) -> Denoise:
        controls = [Control(self.controlnets[k], control)]

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # the ControlNet runs without gradients: it is frozen, and its output does not depend on the adapter
            return controlled_unet(self.unet, x, t, inputs.embeds, controls, adapter=adapter, timestep_cond=timestep_cond,
                                   controlnet_grad=False)  # fmt: skip

        return denoise

    def compute_loss(self, inputs: AdapterInputs, draws: AdapterDraws) -> torch.Tensor:
        cfg = self.config.consistency
        k = draws.k
        control = self.sources[k].maps(inputs.batch).to(self.device)
        timestep_cond = self.base.guidance_cond(self.unet, draws.consistency.w)
        online = self.denoiser(self.model, k, inputs, control, timestep_cond)
        target = self.denoiser(self.unwrapped(), k, inputs, control, timestep_cond)
        f_online, f_target = consistency_pair(online, target, self.base.schedule, inputs.latents, draws.consistency, cfg)
        return consistency_loss(f_online, f_target, draws.consistency, self.base.schedule, cfg)

    def validation_rows(self, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        """For each ControlNet: its control maps, then images from the consistency model through the adapter."""
        pipe, rows = self.base.pipe, []
        for spec, source, controlnet in zip(self.config.controlnets, self.sources, self.controlnets):
            current = pipeline_like(pipe, unet=self.unet, controlnets=[controlnet], adapter=self.unwrapped())
            control = source.maps(batch).to(self.device)
            images = self.sample_images(current, batch, control=control, consistency=True, guidance_scale=self.config.consistency.w + 1.0)
            rows += [(spec.condition, control), ("generated", images)]
        return rows + [("data", batch["images"])]

    def save_outputs(self, output_dir: Path) -> dict[str, Path]:
        path = output_dir / "adapter"
        with atomic_folder(path) as tmp:
            self.unwrapped().save_pretrained(tmp)
        return {"adapter": path}
