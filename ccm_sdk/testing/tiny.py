"""Tiny random models built with the real diffusers/transformers classes, saved in hub layout.

Used by tests, benchmarks and docs: everything here works offline, in seconds, on a CPU.
The layouts are exactly those of hub repositories (``model_index.json`` plus one folder per
component with ``config.json`` and ``*.safetensors``), so the real loading code is exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from diffusers import AutoencoderKL, ControlNetModel, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..models.controlnet import controlnet_from_unet, reinit_zero_convs

TEXT_DIM = 32
GUIDANCE_EMBED_DIM = 32
CONTROL_EMBED_CHANNELS = (8, 16, 16, 32)  # three stride-2 convs: the VAE's factor 8


def offline_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single bytes (no merges), built without any file."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _clip_text_config(tokenizer: CLIPTokenizer, *, hidden_size: int, layers: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
    )


def tiny_text_encoder(tokenizer: CLIPTokenizer, *, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_clip_text_config(tokenizer, hidden_size=TEXT_DIM, layers=2, projection_dim=TEXT_DIM)).eval()


def tiny_unet(*, lcm: bool = True, seed: int = 0, sample_size: int = 8) -> UNet2DConditionModel:
    """A two-level UNet; ``lcm=True`` adds the guidance-scale embedding (``time_cond_proj_dim``)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
        time_cond_proj_dim=GUIDANCE_EMBED_DIM if lcm else None,
    ).eval()


def tiny_vae(*, seed: int = 0) -> AutoencoderKL:
    """An 8x AutoencoderKL (four blocks), 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()


def tiny_controlnet(unet: UNet2DConditionModel, *, conditioning_channels: int = 3, seed: int = 1) -> ControlNetModel:
    """A ControlNet for ``unet`` whose zero convolutions are re-initialised, so control is visible."""
    controlnet = controlnet_from_unet(
        unet, conditioning_channels=conditioning_channels, conditioning_embedding_out_channels=CONTROL_EMBED_CHANNELS
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in controlnet.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    reinit_zero_convs(controlnet, generator=generator, std=0.2)
    with torch.no_grad():  # unit-gain embedding convs, so the control map's content shows through
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
    return controlnet.eval()


def lcm_scheduler() -> LCMScheduler:
    return LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type="epsilon",
        original_inference_steps=50,
        timestep_scaling=10.0,
        timestep_spacing="leading",
    )


def save_tiny_pipeline(path: str | Path, *, lcm: bool = True, seed: int = 0) -> Path:
    """Save a tiny LCM (or, with ``lcm=False``, a plain Stable-Diffusion-style model) in hub layout."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    path = Path(path)
    tokenizer = offline_clip_tokenizer()
    components = dict(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(tokenizer, seed=seed),
        tokenizer=tokenizer,
        unet=tiny_unet(lcm=lcm, seed=seed),
        scheduler=lcm_scheduler(),
        safety_checker=None,
        feature_extractor=None,
    )
    pipeline_cls = LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline
    pipeline = pipeline_cls(**components, requires_safety_checker=False)
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_controlnet(path: str | Path, model_path: str | Path, *, conditioning_channels: int = 3, seed: int = 1) -> Path:
    """Save a tiny ControlNet that fits the UNet saved at ``model_path`` (an SDXL ControlNet, with
    ``addition_embed_type="text_time"``, for an SDXL model)."""
    unet = UNet2DConditionModel.from_pretrained(Path(model_path) / "unet")
    tiny_controlnet(unet, conditioning_channels=conditioning_channels, seed=seed).save_pretrained(path, safe_serialization=True)
    return Path(path)


# --- SDXL -------------------------------------------------------------------------------
# Two encoders of different widths, so the hidden states' order and the pooled source both show.
SDXL_TEXT_DIM, SDXL_TEXT_DIM_2, SDXL_POOLED_DIM = 32, 48, 24
SDXL_TIME_EMBED_DIM = 8


def tiny_sdxl_text_encoder_2(tokenizer: CLIPTokenizer, *, seed: int = 0) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder: a CLIP text model with a projection (its pooled output)."""
    torch.manual_seed(seed)
    config = _clip_text_config(tokenizer, hidden_size=SDXL_TEXT_DIM_2, layers=3, projection_dim=SDXL_POOLED_DIM)
    return CLIPTextModelWithProjection(config).eval()


def tiny_sdxl_unet(*, lcm: bool = True, seed: int = 0, sample_size: int = 8) -> UNet2DConditionModel:
    """A two-level SDXL-architecture UNet (``addition_embed_type="text_time"``, linear projections,
    per-block transformer depth); ``lcm=True`` adds the guidance-scale embedding."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=SDXL_TEXT_DIM + SDXL_TEXT_DIM_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_POOLED_DIM,
        norm_num_groups=8,
        time_cond_proj_dim=GUIDANCE_EMBED_DIM if lcm else None,
    ).eval()


def save_tiny_sdxl_pipeline(path: str | Path, *, lcm: bool = True, seed: int = 0) -> Path:
    """Save a tiny SDXL-architecture model (an LCM-SDXL with ``lcm=True``) in diffusers' SDXL hub layout."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    tokenizer = offline_clip_tokenizer()
    pipeline = StableDiffusionXLPipeline(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(tokenizer, seed=seed),
        text_encoder_2=tiny_sdxl_text_encoder_2(tokenizer, seed=seed + 1),
        tokenizer=tokenizer,
        tokenizer_2=offline_clip_tokenizer(),
        unet=tiny_sdxl_unet(lcm=lcm, seed=seed),
        scheduler=lcm_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path
