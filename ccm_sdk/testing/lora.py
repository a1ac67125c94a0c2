"""A random LoRA for a saved UNet, written in diffusers' LoRA layout (stands in for LCM-LoRA in tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def save_random_unet_lora(model_dir: str | Path, out_dir: str | Path, *, rank: int = 4, seed: int = 0, std: float = 0.05) -> Path:
    """Attach a rank-``rank`` LoRA with random weights to the UNet at ``model_dir``; save it."""
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    # peft's key names as they are: diffusers' own loader drops the attention layers of
    # converted keys, and the parity test would then check less than it says.
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(out_dir),
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    return Path(out_dir) / "pytorch_lora_weights.safetensors"
