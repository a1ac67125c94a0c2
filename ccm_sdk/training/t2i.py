"""Text-to-image diffusion training of a ``UNet2DConditionModel`` on a frozen VAE and text encoder
(or, with ``train_text_encoder``, the text encoder trained jointly with the UNet).

    x0 = scaling_factor * z,  z ~ q(z|image),  c = text(caption, or "" with probability data.caption_dropout)
    t ~ U{0..T-1},  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = E w(t) || target - unet(x_t, t, c) ||^2,   target = eps (or v = sqrt(abar) eps - sqrt(1 - abar) x0)
    w(t) = 1, or with min_snr_gamma:  min(SNR, gamma) / SNR (epsilon), min(SNR, gamma) / (SNR + 1) (v),
           SNR = abar / (1 - abar)   (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting")

With ``train_text_encoder`` the CLIP text encoder's weights learn from the same loss (at
``text_encoder_lr``): c is computed with gradients, the EMA covers both, and the exported model
folder holds the trained encoder, so every model built on it (the LCM, the ControlNets) reads
captions the way the UNet learned to.

With ``grounding_weight`` > 0 the loss adds the token-grounding term of :mod:`.grounding` (each
caption word's cross-attention inside the pixels it names), for datasets whose items carry
``regions`` and ``word_regions``:  loss = diffusion loss + grounding_weight * grounding loss.

Caption dropout trains the unconditional branch that classifier-free guidance needs. The UNet is
new (``architecture``), or starts from ``unet`` or the ``model`` folder's; with ``ema_decay`` > 0
an EMA of its weights (decay min(ema_decay, (1 + n) / (10 + n)) after n updates, as diffusers'
EMAModel) is kept, checkpointed and exported. The output is a full diffusers model folder
(``output_dir/model``: unet, vae, text_encoder, tokenizer, a DDIM scheduler config, model_index.json)
that ``CCMPipeline.from_pretrained`` loads, the ``lcd`` trainer distils and ``dm_controlnet`` builds on.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from ..errors import ImageSizeError, IncompatibleModelsError, InputError, MissingModelError, TrainingError
from ..models.loading import load_component, read_json, resolve_model_path
from ..models.sdxl import takes_text_time
from ..pipeline import CCMPipeline
from ..schedule import NoiseSchedule
from ..utils.atomic import atomic_folder
from .config import Section, TrainConfig, check_levels
from .core import Trainer
from .dm_controlnet import DiffusionDraws, diffusion_target
from .export import _float32_copy
from .frozen import FrozenBase, drop_captions, freeze
from .grounding import GroundingTargets, WordTokens, grounding_loss, grounding_targets, record_cross_attention
from .text_encoder import load_text_encoder
from .vae import load_vae

SCHEDULER_CLASS = "DDIMScheduler"


class UNetArchitecture(Section):
    """A new diffusers UNet2DConditionModel; in/out channels and cross_attention_dim come from the VAE and text encoder."""

    block_out_channels: tuple[int, ...] = Field(default=(64, 128, 256), min_length=1)
    layers_per_block: int = Field(default=2, ge=1)
    down_block_types: tuple[str, ...] | None = Field(default=None, description="None: CrossAttnDownBlock2D per level, DownBlock2D last")
    up_block_types: tuple[str, ...] | None = Field(default=None, description="None: UpBlock2D first, CrossAttnUpBlock2D after")
    attention_head_dim: int = Field(default=8, ge=1, description="attention heads per transformer block (diffusers' naming)")
    transformer_layers_per_block: int = Field(default=1, ge=1)
    norm_num_groups: int = Field(default=32, ge=1)
    sample_size: int | None = Field(
        default=None, ge=1, description="latent size; None: data.resolution (else the VAE's sample_size) / the VAE factor"
    )

    @model_validator(mode="after")
    def _consistent(self):
        check_levels(self, self.down_block_types, self.up_block_types)
        return self


class NoiseScheduleSection(Section):
    """The DDPM-family noise schedule written as the model's scheduler config."""

    num_train_timesteps: int = Field(default=1000, ge=2)
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = Field(default=0.00085, gt=0.0, lt=1.0)
    beta_end: float = Field(default=0.012, gt=0.0, lt=1.0)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    rescale_betas_zero_snr: bool = Field(
        default=False,
        description="rescale to zero terminal SNR (Lin et al. 2024) so that no image statistics survive at the last "
        "timestep; needs v_prediction",
    )
    timestep_spacing: Literal["leading", "trailing", "linspace"] = Field(
        default="leading", description="sampling timesteps; 'trailing' starts at the last timestep (use it with zero SNR)"
    )

    @model_validator(mode="after")
    def _zero_snr_needs_v(self):
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                f"rescale_betas_zero_snr needs prediction_type 'v_prediction' (epsilon cannot give x0 at zero SNR), "
                f"got {self.prediction_type!r}"
            )
        return self


class T2ITrainConfig(TrainConfig):
    """Text-to-image diffusion training of a UNet on a frozen VAE and text encoder."""

    model: str | None = Field(
        default=None, description="a diffusers model folder supplying what vae / text_encoder / unet / scheduler leave unset"
    )
    vae: str | None = Field(default=None, description="a vae folder (the vae trainer's output) or a model folder holding vae/")
    text_encoder: str | None = Field(default=None, description="a folder holding text_encoder/ and tokenizer/ (build_text_encoder)")
    unet: str | None = Field(default=None, description="initial UNet: a unet folder or a model folder holding unet/")
    architecture: UNetArchitecture | None = Field(default=None, description="a new UNet of this shape (instead of unet / the model's)")
    scheduler: NoiseScheduleSection | None = Field(default=None, description="None: the model's scheduler, or these defaults")
    min_snr_gamma: float | None = Field(default=None, gt=0.0, description="min-SNR loss weighting min(SNR, gamma) / SNR (5.0 is usual)")
    ema_decay: float = Field(default=0.0, ge=0.0, lt=1.0, description="EMA of the UNet weights, exported when > 0; 0: no EMA")
    train_text_encoder: bool = Field(
        default=False, description="train the text encoder jointly with the UNet (exported with it); false: it stays frozen"
    )
    text_encoder_lr: float | None = Field(
        default=None, gt=0.0, description="the text encoder's learning rate with train_text_encoder; None: train.lr"
    )
    grounding_weight: float = Field(
        default=0.0, ge=0.0, description="weight of the token-grounding loss (cross-attention of each caption word inside "
        "its region; the dataset's items need 'regions' and 'word_regions'); 0: none",
    )  # fmt: skip

    @model_validator(mode="after")
    def _sources(self):
        if self.unet is not None and self.architecture is not None:
            raise ValueError("set either unet (initial weights) or architecture (a new UNet), not both")
        given = {"vae": self.vae, "text_encoder": self.text_encoder, "unet or architecture": self.unet or self.architecture}
        missing = [name for name, value in given.items() if value is None and self.model is None]
        if missing:
            raise ValueError(f"no {', no '.join(missing)}: set them, or model (a diffusers model folder supplying them)")
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise ValueError("text_encoder_lr is set but train_text_encoder is false: set train_text_encoder: true, or drop text_encoder_lr")
        if self.grounding_weight > 0 and self.train.gradient_checkpointing:
            raise ValueError(
                "grounding_weight > 0 reads the cross-attention probabilities of the forward pass, which gradient "
                "checkpointing recomputes in the backward pass: set train.gradient_checkpointing: false, or grounding_weight: 0"
            )
        return self


@dataclass
class T2IInputs:
    latents: torch.Tensor
    embeds: torch.Tensor | None  # frozen text encoder: its hidden states
    input_ids: torch.Tensor | None = None  # trained text encoder: the token ids it encodes inside the step
    grounding: GroundingTargets | None = None  # grounding_weight > 0: each token's region


class TextToImageModel(torch.nn.Module):
    """The UNet and the text encoder as one trainable module (``train_text_encoder``): one forward
    from token ids, so gradients and distributed sync reach both."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, D], as the pipeline encodes prompts: without an attention mask
        (``build`` refuses an encoder whose config asks for one)."""
        return self.text_encoder(input_ids)[0]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=self.encode(input_ids), return_dict=False)[0]


def unet_of(module: torch.nn.Module) -> torch.nn.Module:
    """The UNet of a trainable module (the module itself, or a TextToImageModel's)."""
    return module.unet if isinstance(module, TextToImageModel) else module


def scheduler_config(section: NoiseScheduleSection) -> dict[str, Any]:
    """A DDPM-family scheduler config (Stable Diffusion's fixed settings, the section's schedule)."""
    return {
        **section.model_dump(),
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 1,
    }


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma for the schedule's prediction type."""
    alpha = schedule.alpha(t).double()
    snr = alpha / (1 - alpha)
    clipped = snr.clamp(max=gamma)
    if schedule.prediction_type == "epsilon":
        weights = clipped / snr
    elif schedule.prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:  # sample (x0) prediction
        weights = clipped
    return weights.float()


def new_unet(architecture: UNetArchitecture, *, latent_channels: int, cross_attention_dim: int, sample_size: int) -> UNet2DConditionModel:
    """A UNet2DConditionModel of ``architecture`` (diffusers' initialisation, from the global RNG)."""
    levels = len(architecture.block_out_channels)
    down = architecture.down_block_types or ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = architecture.up_block_types or ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    if levels == 1 and architecture.down_block_types is None:
        down, up = ("CrossAttnDownBlock2D",), ("CrossAttnUpBlock2D",)
    try:
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=architecture.block_out_channels,
            layers_per_block=architecture.layers_per_block,
            attention_head_dim=architecture.attention_head_dim,
            transformer_layers_per_block=architecture.transformer_layers_per_block,
            norm_num_groups=architecture.norm_num_groups,
            cross_attention_dim=cross_attention_dim,
        )
    except ValueError as exc:  # an unknown block type, mismatched lists
        raise InputError(f"architecture: diffusers cannot build this UNet2DConditionModel: {exc}") from None


def load_unet(source: str) -> UNet2DConditionModel:
    """A UNet from a unet folder or a model folder holding ``unet/``."""
    root = resolve_model_path(source, what="UNet")
    if (root / "unet" / "config.json").is_file():
        root = root / "unet"
    elif not (root / "config.json").is_file():
        raise MissingModelError(f"UNet {source!r}: expected a unet folder (config.json + safetensors) or a model folder holding unet/")
    return load_component(UNet2DConditionModel, root, what=f"UNet {source!r}")


class T2ITrainer(Trainer):
    """Trains a text-to-image diffusion UNet; exports a diffusers model folder."""

    name = "t2i"
    description = "a text-to-image diffusion UNet on a frozen VAE and a frozen (or jointly trained) text encoder"
    config_class = T2ITrainConfig

    # --- models -------------------------------------------------------------------------

    def load_parts(self) -> dict[str, Any]:
        """Frozen VAE, tokenizer, text encoder and the scheduler config, fresh from their folders (float32)."""
        cfg = self.config
        tokenizer, text_encoder = load_text_encoder(cfg.text_encoder or cfg.model)
        parts = {"vae": load_vae(cfg.vae or cfg.model), "tokenizer": tokenizer, "text_encoder": text_encoder}
        if cfg.scheduler is not None:
            parts["scheduler_config"] = scheduler_config(cfg.scheduler)
        elif cfg.model is not None:
            root = resolve_model_path(cfg.model)
            config = read_json(root / "scheduler" / "scheduler_config.json", what=f"model {cfg.model!r}, scheduler")
            parts["scheduler_config"] = {k: v for k, v in config.items() if not k.startswith("_")}
        else:
            parts["scheduler_config"] = scheduler_config(NoiseScheduleSection())
        return parts

    def build(self) -> UNet2DConditionModel:
        cfg = self.config
        # 1. the frozen parts
        parts = self.load_parts()
        vae, text_encoder = parts["vae"], parts["text_encoder"]
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        # 2. the UNet: new, from a folder, or the model's
        if cfg.architecture is not None:
            vae_size = vae.config.sample_size
            vae_size = vae_size[0] if isinstance(vae_size, (list, tuple)) else vae_size
            size = cfg.architecture.sample_size or (cfg.data.resolution or vae_size) // factor
            unet = new_unet(
                cfg.architecture, latent_channels=vae.config.latent_channels,
                cross_attention_dim=text_encoder.config.hidden_size, sample_size=max(1, size),
            )  # fmt: skip
        else:
            unet = load_unet(cfg.unet or cfg.model)
        if takes_text_time(unet.config):
            raise IncompatibleModelsError(
                "t2i trains Stable Diffusion 1.x/2.x-layout UNets (one text encoder), but this UNet is an SDXL one "
                "(addition_embed_type 'text_time'); SDXL bases are taken by dm_controlnet, ct_controlnet, adapter, lcd and dreambooth"
            )
        if unet.config.get("time_cond_proj_dim") is not None:
            raise IncompatibleModelsError(
                "t2i trains a diffusion model, but this UNet takes a guidance embedding (time_cond_proj_dim): it is a consistency model"
            )
        # 3. the pipeline checks that the parts fit together (latent channels, text width)
        self.pipe = CCMPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=parts["tokenizer"],
                                scheduler_config=parts["scheduler_config"])  # fmt: skip
        self.base = FrozenBase(self.pipe, device=self.device, weight_dtype=self.weight_dtype)
        unet.requires_grad_(True)
        self.enable_gradient_checkpointing(unet)
        self.attention = record_cross_attention(unet) if cfg.grounding_weight > 0 else None
        self.words = WordTokens(parts["tokenizer"], parts["tokenizer"].model_max_length)
        trainable: torch.nn.Module = unet
        if cfg.train_text_encoder:
            if getattr(text_encoder.config, "use_attention_mask", False):
                raise IncompatibleModelsError("train_text_encoder: this text encoder asks for an attention mask, which t2i does not pass")
            text_encoder.to(self.device, torch.float32).requires_grad_(True).train()
            trainable = TextToImageModel(unet, text_encoder)
        # 4. the EMA copy (of the UNet, and the text encoder when it trains)
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = copy.deepcopy(trainable)
            freeze(self.ema)
            self.ema.to(self.device)
            self.ema_updates = 0
        return trainable

    def optimizer_groups(self, params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        """With ``train_text_encoder`` and ``text_encoder_lr``: the text encoder's weights in a group at that rate."""
        cfg = self.config
        if not cfg.train_text_encoder or cfg.text_encoder_lr is None:
            return super().optimizer_groups(params)
        encoder = {id(p) for p in self.model.text_encoder.parameters()}
        return [
            {"params": [p for p in params if id(p) not in encoder]},
            {"params": [p for p in params if id(p) in encoder], "lr": cfg.text_encoder_lr},
        ]

    # --- data ---------------------------------------------------------------------------

    def setup(self) -> None:
        """As the base class, then check captions and image size before any step runs."""
        if self.model is not None:
            return
        super().setup()
        self.check_dataset(self.dataset)

    def check_dataset(self, dataset: Dataset) -> None:
        """Every image needs a caption (unless data.default_caption) and a size the VAE can encode."""
        records = getattr(dataset, "records", None)
        if records is not None and self.config.data.default_caption is None:
            missing = [i for i, record in enumerate(records) if record.caption is None]
            if missing:
                try:
                    dataset[missing[0]]
                except TrainingError as exc:
                    raise TrainingError(
                        f"t2i learns from captions, but {len(missing)} of {len(records)} images have none: {exc}"
                    ) from None
        height, width = dataset[0]["image"].shape[-2:]  # a torch Dataset without captions fails here
        factor = self.base.vae_scale_factor
        if height % factor or width % factor:
            raise ImageSizeError(f"training images are {height}x{width}, not multiples of the VAE factor {factor}; set data.resolution")

    # --- loss ---------------------------------------------------------------------------

    def prepare_inputs(self, batch: dict[str, Any]) -> T2IInputs:
        latents = self.base.encode_batch(batch)
        captions = drop_captions(batch["captions"], self.config.data.caption_dropout)
        grounding = grounding_targets(batch, captions, self.words) if self.attention is not None else None
        if self.config.train_text_encoder:
            input_ids, _ = self.pipe._tokenize(tuple(captions), self.pipe.tokenizer.model_max_length)
            return T2IInputs(latents=latents, embeds=None, input_ids=input_ids.to(self.device), grounding=grounding)
        return T2IInputs(latents=latents, embeds=self.base.encode_text(captions), grounding=grounding)

    def sample_draws(self, inputs: T2IInputs) -> DiffusionDraws:
        t = torch.randint(0, self.base.schedule.num_train_timesteps, (inputs.latents.shape[0],))
        return DiffusionDraws(t=t, noise=torch.randn_like(inputs.latents))

    def compute_loss(self, inputs: T2IInputs, draws: DiffusionDraws) -> torch.Tensor:
        schedule = self.base.schedule
        x_t = schedule.add_noise(inputs.latents, draws.noise, draws.t)
        if inputs.grounding is not None:
            self.attention.start()
        try:
            if inputs.input_ids is not None:
                prediction = self.model(x_t, draws.t.to(self.device), inputs.input_ids)
            else:
                prediction = self.model(x_t, draws.t.to(self.device), encoder_hidden_states=inputs.embeds, return_dict=False)[0]
        finally:
            probs = self.attention.stop() if inputs.grounding is not None else []
        target = diffusion_target(schedule, inputs.latents, draws.noise, draws.t)
        per_sample = (prediction.float() - target.float()).square().flatten(1).mean(1)
        if self.config.min_snr_gamma is not None:
            per_sample = min_snr_weights(schedule, draws.t, self.config.min_snr_gamma).to(per_sample.device) * per_sample
        loss = per_sample.mean()
        if inputs.grounding is not None:
            loss = loss + self.config.grounding_weight * grounding_loss(probs, inputs.grounding, tuple(inputs.latents.shape[-2:]))
        return loss

    def validation_rows(self, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        pipe = self.pipe
        current_model = self.ema if self.ema is not None else self.unwrapped()
        text_encoder = current_model.text_encoder if isinstance(current_model, TextToImageModel) else pipe.text_encoder
        current = CCMPipeline(unet=unet_of(current_model), vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer,
                              scheduler_config=pipe.schedule.scheduler_config)  # fmt: skip
        was_training = text_encoder.training
        text_encoder.eval()
        try:
            images = self.sample_images(current, batch, consistency=False, guidance_scale=7.5)
        finally:
            text_encoder.train(was_training)
        return [("generated", images), ("data", batch["images"])]

    # --- EMA ----------------------------------------------------------------------------

    def ema_decay_now(self) -> float:
        return min(self.config.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.ema is None:
            return
        decay = self.ema_decay_now()
        online = dict(self.unwrapped().named_parameters())
        for name, param in self.ema.named_parameters():
            param.lerp_(online[name].detach(), 1.0 - decay)
        self.ema_updates += 1

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.ema is None:
            return {}
        return {"ema": dict(self.ema.named_parameters()), "ema_state": {"updates": torch.tensor([float(self.ema_updates)])}}

    def load_extra_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.ema is None:
            return
        names = {name for name, _ in self.ema.named_parameters()}
        if "ema" not in weights or set(weights["ema"]) != names or "ema_state" not in weights:
            raise TrainingError("the checkpoint has no EMA weights matching this run (was ema_decay 0 when it was written?)")
        self.ema.load_state_dict(weights["ema"], strict=False)
        self.ema_updates = int(weights["ema_state"]["updates"].item())

    # --- output -------------------------------------------------------------------------

    def save_outputs(self, output_dir: Path) -> dict[str, Path]:
        """The EMA (or trained) UNet (and text encoder, when it trained) with fresh float32 copies of
        the frozen parts, in diffusers layout."""
        parts = self.load_parts()
        trained = self.ema if self.ema is not None else self.unwrapped()
        unet = _float32_copy(unet_of(trained))
        if isinstance(trained, TextToImageModel):
            parts["text_encoder"] = copy.deepcopy(trained.text_encoder).to("cpu", torch.float32).requires_grad_(False).eval()
        pipe = CCMPipeline(unet=unet, vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                           scheduler_config=parts["scheduler_config"])  # fmt: skip
        out = output_dir / "model"
        with atomic_folder(out) as tmp:
            pipe.save_pretrained(tmp)
            use_scheduler_class(tmp, SCHEDULER_CLASS)
        return {"model": out}


def use_scheduler_class(folder: Path, name: str) -> None:
    """Name ``name`` as the folder's scheduler (CCMPipeline writes LCMScheduler; a diffusion model
    loaded by diffusers' StableDiffusionPipeline should get a diffusion sampler)."""
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    index_file = folder / CCMPipeline.model_index_name
    index = json.loads(index_file.read_text())
    index["scheduler"] = ["diffusers", name]
    index_file.write_text(json.dumps(index, indent=2))
