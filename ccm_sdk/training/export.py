"""Writing trained weights as folders CCMPipeline loads directly, and pushing them to the hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..models.generation_defaults import GenerationDefaults
from ..utils.atomic import atomic_folder

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def save_pipeline_with_unet(
    model: str | os.PathLike, unet: torch.nn.Module, out: str | os.PathLike, *, scheduler_updates: dict[str, Any] | None = None,
    generation_defaults: GenerationDefaults | None = None,
) -> Path:
    """The base model at ``model`` with its UNet replaced by ``unet``, saved in diffusers layout.

    The other components are loaded afresh in float32 so mixed-precision copies never leak out;
    an SDXL base keeps its second text encoder and tokenizer. ``generation_defaults`` replaces the
    base's (``ccm_defaults.json``: what the new UNet should be sampled with).
    """
    from ..pipeline import CCMPipeline
    from .frozen import pipeline_like

    base = CCMPipeline.from_pretrained(model)
    scheduler_config = {**base.schedule.scheduler_config, **(scheduler_updates or {})}
    pipe = pipeline_like(base, unet=_float32_copy(unet), scheduler_config=scheduler_config,
                         generation_defaults=generation_defaults or base.generation_defaults)  # fmt: skip
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp)
    return Path(out)


def _float32_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy built from the config, so no second copy lands on the accelerator."""
    copy = type(unet).from_config(unet.config)
    copy.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in unet.state_dict().items()})
    return copy.eval()


def save_unet_lora(unet: torch.nn.Module, out: str | os.PathLike) -> Path:
    """The UNet's LoRA as ``pytorch_lora_weights.safetensors`` (``CCMPipeline.from_pretrained(model, lora=file)``).

    Keys stay in peft's naming, as diffusers' LCM-LoRA script writes them: diffusers' loader maps
    them back to every layer (the older ``lora.down``/``lora.up`` naming loses the attention
    projections on load), and the adapter config goes in the metadata so ``lora_alpha`` survives.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import get_peft_model_state_dict

    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    metadata = unet.peft_config["default"].to_dict()
    with atomic_folder(out) as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(tmp), unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
        )
    return Path(out) / LORA_WEIGHTS_NAME


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = True, commit_message: str = "ccm-sdk training output") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (needs network access and a hub token)."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, exist_ok=True)
    info = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
