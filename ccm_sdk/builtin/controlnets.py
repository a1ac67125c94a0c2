"""Built-in ControlNet providers: diffusers folders / hub ids, and fresh ControlNets from a UNet."""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from ..hookspecs import hookimpl
from ..models.controlnet import controlnet_from_unet
from ..models.loading import load_component, read_json, resolve_model_path


def diffusers_controlnet(
    source, *, torch_dtype: torch.dtype = torch.float32, local_files_only: bool | None = None, strict: bool = True
) -> ControlNetModel:
    """A diffusers ControlNetModel from a local folder or hub repo id (safetensors only; ``strict``:
    unknown config keys are errors, see :func:`~ccm_sdk.models.loading.load_component`)."""
    path = resolve_model_path(source, local_files_only=local_files_only, what="ControlNet")
    return load_component(ControlNetModel, path, what=f"ControlNet {str(source)!r}", torch_dtype=torch_dtype, strict=strict)


def controlnet_from_model(
    source, *, torch_dtype: torch.dtype = torch.float32, local_files_only: bool | None = None, conditioning_channels: int = 3
) -> ControlNetModel:
    """A new ControlNet initialised from the UNet of the model at ``source`` (training starts here).

    Its conditioning embedding downsamples by the model's VAE factor.
    """
    root = resolve_model_path(source, local_files_only=local_files_only, what="model")
    unet = load_component(UNet2DConditionModel, root / "unet", what=f"UNet of {str(source)!r}", torch_dtype=torch_dtype)
    vae_config = read_json(root / "vae" / "config.json", what=f"VAE config of {str(source)!r}")
    levels = len(vae_config.get("block_out_channels", (0, 0, 0, 0)))
    embedding_channels = (16, 32, 96, 256, 256, 256, 256)[:levels]
    return controlnet_from_unet(unet, conditioning_channels=conditioning_channels, conditioning_embedding_out_channels=embedding_channels)


@hookimpl
def register_controlnets(register):
    register(diffusers_controlnet, name="diffusers")
    register(controlnet_from_model, name="from-unet")
