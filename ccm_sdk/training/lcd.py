"""Latent consistency distillation (LCD) of a text-to-image diffusion model into an LCM
(method doc, section 7), following diffusers' ``train_lcm_distill_*`` recipes.

    t_{n+k} ~ skipping grid (k = T // num_ddim_timesteps),  t_n = max(t_{n+k} - k, 0)
    x_{t_{n+k}} = sqrt(abar) x0 + sqrt(1 - abar) z,  w ~ U[w_min, w_max]
    teacher (frozen), CFG-augmented DDIM step:
        x0_g = x0_c + w (x0_c - x0_u),  eps_g = eps_c + w (eps_c - eps_u)
        x_{t_n} = sqrt(abar_n) x0_g + sqrt(1 - abar_n) eps_g
    loss = d( f_theta(x_{t_{n+k}}, t_{n+k}, w),  f_{theta^-}(x_{t_n}, t_n, w) ),  theta^- = EMA(theta)

``mode: full`` trains a student UNet initialised from the teacher plus a new w-embedding
projection (``time_cond_proj_dim``), zero-initialised so the student starts as the teacher;
``mode: lora`` trains an LCM-LoRA on the teacher's own UNet (no w-embedding, as LCM-LoRA).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from pydantic import Field, model_validator

from ..errors import IncompatibleModelsError, TrainingError
from ..models.conditioning import Conditioning, cat_conditioning
from ..models.controlled_unet import controlled_unet
from ..models.generation_defaults import GenerationDefaults
from ..pipeline import CCMPipeline
from .config import LoraSection, TrainConfig
from .core import Trainer
from .ema import EmaTarget, EmaTargetHooks
from .export import save_pipeline_with_unet, save_unet_lora
from .frozen import FrozenBase, freeze, pipeline_like, place
from .lora import add_unet_lora
from .losses import l2, pseudo_huber


class LCDTrainConfig(TrainConfig):
    """Latent consistency distillation of a text-to-image diffusion model (method doc, section 7)."""

    mode: Literal["full", "lora"] = Field(default="full", description="train a full student UNet (with w-embedding) or an LCM-LoRA")
    lora: LoraSection = Field(default_factory=LoraSection)
    num_ddim_timesteps: int = Field(default=50, ge=2, description="skipping-step grid; k = num_train_timesteps // this")
    w_min: float = Field(default=5.0, ge=0.0)
    w_max: float = Field(default=15.0, ge=0.0)
    loss: Literal["l2", "huber"] = "l2"
    huber_c: float = Field(default=0.001, gt=0.0)
    ema_decay: float = Field(default=0.95, ge=0.0, lt=1.0, description="EMA target network; 0: the student itself, stop-gradient")
    time_cond_proj_dim: int = Field(default=256, ge=2, description="w-embedding width of a full student")
    negative_prompt: str = Field(default="", description="the teacher's unconditional prompt")

    @model_validator(mode="after")
    def _ordered_w(self):
        if self.w_min > self.w_max:
            raise ValueError(f"expected w_min <= w_max, got {self.w_min} > {self.w_max}")
        return self


@dataclass
class LCDInputs:
    latents: torch.Tensor
    embeds: torch.Tensor | Conditioning  # SDXL: with the pooled embeddings and time ids
    uncond_embeds: torch.Tensor | Conditioning


@dataclass
class LCDDraws:
    index: torch.Tensor  # [B] long: grid index of the start point t_{n+k}
    noise: torch.Tensor
    w: torch.Tensor  # [B] guidance w


class LCDTrainer(EmaTargetHooks, Trainer):
    """Distils a diffusion model's UNet into a latent consistency model (full UNet or LoRA)."""

    name = "lcd"
    description = "latent consistency distillation of a diffusion model into an LCM (full UNet or LoRA)"
    config_class = LCDTrainConfig

    def build(self) -> UNet2DConditionModel:
        cfg = self.config
        # 1. the teacher
        pipe = CCMPipeline.from_pretrained(cfg.model)
        if pipe.is_lcm:
            raise IncompatibleModelsError(
                f"the LCD teacher {cfg.model!r} already takes a guidance embedding (time_cond_proj_dim); distil a diffusion model"
            )
        self.base = FrozenBase(pipe, device=self.device, weight_dtype=self.weight_dtype)
        teacher = pipe.unet
        # 2. the student, from the teacher's float32 weights
        if cfg.mode == "full":
            student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": cfg.time_cond_proj_dim})
            missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
            if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
                raise TrainingError(f"the student UNet does not match the teacher's weights (missing {missing}, unexpected {unexpected})")
            torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
            student.requires_grad_(True)
        else:
            student = copy.deepcopy(teacher)
            add_unet_lora(student, cfg.lora)
        freeze(teacher)
        self.teacher = place(teacher, self.device, self.weight_dtype)
        # 3. the EMA target network (decay 0: the student itself under no_grad)
        self.ema = EmaTarget(student, cfg.ema_decay, self.device) if cfg.ema_decay > 0 else None
        self.target = self.ema.module if self.ema is not None else None
        self.grid = torch.from_numpy(self.base.schedule.skipping_grid(cfg.num_ddim_timesteps))
        self.skip = self.base.schedule.num_train_timesteps // cfg.num_ddim_timesteps
        self.enable_gradient_checkpointing(student)
        return student

    def prepare_inputs(self, batch: dict[str, Any]) -> LCDInputs:
        embeds = self.base.conditioning(batch, dropout=self.config.data.caption_dropout)
        return LCDInputs(
            latents=self.base.encode_batch(batch),
            embeds=embeds,
            uncond_embeds=self.base.negative_conditioning(batch, self.config.negative_prompt, embeds),
        )

    def sample_draws(self, inputs: LCDInputs) -> LCDDraws:
        cfg, batch = self.config, inputs.latents.shape[0]
        index = torch.randint(0, cfg.num_ddim_timesteps, (batch,))
        noise = torch.randn_like(inputs.latents)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(batch)
        return LCDDraws(index=index, noise=noise, w=w)

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, inputs: LCDInputs, w: torch.Tensor) -> torch.Tensor:
        """One CFG-augmented DDIM step of the frozen teacher from (x, t) to t_prev."""
        schedule = self.base.schedule
        both = cat_conditioning([inputs.embeds, inputs.uncond_embeds])
        out = controlled_unet(self.teacher, torch.cat([x, x]).to(self.weight_dtype), torch.cat([t, t]).to(self.device), both).float()
        cond, uncond = out.chunk(2)
        x0_c, x0_u = schedule.to_x0(cond, x, t), schedule.to_x0(uncond, x, t)
        eps_c, eps_u = schedule.to_eps(cond, x, t), schedule.to_eps(uncond, x, t)
        w = w.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x0_g = x0_c + w * (x0_c - x0_u)
        eps_g = eps_c + w * (eps_c - eps_u)
        return schedule.add_noise(x0_g, eps_g, t_prev)

    def compute_loss(self, inputs: LCDInputs, draws: LCDDraws) -> torch.Tensor:
        cfg, schedule = self.config, self.base.schedule
        # 1. the start point on the skipping grid and its target timestep
        t_start = self.grid[draws.index.cpu()]
        t_prev = (t_start - self.skip).clamp(min=0)
        x_start = schedule.add_noise(inputs.latents, draws.noise, t_start)
        timestep_cond = self.base.guidance_cond(self.unwrapped(), draws.w)
        # 2. the student's prediction (with gradients)
        out = controlled_unet(self.model, x_start, t_start.to(self.device), inputs.embeds, timestep_cond=timestep_cond)
        f_student, _ = schedule.consistency(out.float(), x_start.float(), t_start)
        # 3. the teacher's guided ODE step, then the target network at t_n
        x_prev = self.teacher_step(x_start, t_start, t_prev, inputs, draws.w)
        with torch.no_grad():
            target_net = self.target if self.target is not None else self.unwrapped()
            out_prev = controlled_unet(target_net, x_prev, t_prev.to(self.device), inputs.embeds, timestep_cond=timestep_cond)
            f_target, _ = schedule.consistency(out_prev.float(), x_prev.float(), t_prev)
        # 4. distance
        if cfg.loss == "huber":
            return pseudo_huber(f_student, f_target, cfg.huber_c)
        return l2(f_student, f_target)

    def recommended_guidance(self) -> float:
        """The guidance scale the student is sampled with by default: the middle of the distilled w
        range, as a scale (w + 1); written into the exported LCM's ``ccm_defaults.json``."""
        return (self.config.w_min + self.config.w_max) / 2 + 1.0

    def validation_rows(self, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        cfg, pipe = self.config, self.base.pipe
        student = self.target if self.target is not None else self.unwrapped()
        current = pipeline_like(pipe, unet=student)
        # an LCM-LoRA student has no w-embedding: the consistency sampler with plain CFG
        guidance = self.recommended_guidance()
        images = self.sample_images(current, batch, consistency=True, guidance_scale=guidance)
        return [("generated", images), ("data", batch["images"])]

    def save_outputs(self, output_dir: Path) -> dict[str, Path]:
        if self.config.mode == "lora":
            return {"lora": save_unet_lora(self.unwrapped(), output_dir / "lora")}
        path = save_pipeline_with_unet(
            self.config.model, self.unwrapped(), output_dir / "lcm",
            scheduler_updates={"original_inference_steps": self.config.num_ddim_timesteps},
            generation_defaults=GenerationDefaults(guidance_scale=self.recommended_guidance()),
        )  # fmt: skip
        return {"lcm": path}
