"""LoRA on a diffusers UNet through peft (LCM-LoRA, DreamBooth-LoRA)."""

from __future__ import annotations

import torch

from ..errors import InputError
from .config import LoraSection


def add_unet_lora(unet: torch.nn.Module, config: LoraSection) -> list[str]:
    """Freeze the UNet and inject trainable LoRA layers; returns the names of the trainable parameters.

    Only ``target_modules`` that exist in this UNet are used (small UNets lack some), and at
    least one must.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    names = {name for name, _ in unet.named_modules()}
    targets = [t for t in config.target_modules if any(n == t or n.endswith(f".{t}") for n in names)]
    if not targets:
        raise InputError(f"none of the LoRA target_modules {config.target_modules} exist in this UNet")
    unet.add_adapter(
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha if config.alpha is not None else config.rank,
            lora_dropout=config.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
    )
    return [name for name, p in unet.named_parameters() if p.requires_grad]
