"""Building ControlNets for a UNet, and checking that a UNet/ControlNet pair fits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from ..errors import IncompatibleModelsError

# Config keys a ControlNet must share with its UNet for the residuals to line up.
_SHARED_KEYS = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim", "addition_embed_type")


def controlnet_from_unet(
    unet: UNet2DConditionModel,
    *,
    conditioning_channels: int = 3,
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
    zero_init_outputs: bool = True,
) -> ControlNetModel:
    """A ControlNet initialised from ``unet``'s encoder, as ControlNet training starts.

    Unlike ``ControlNetModel.from_unet`` this works on LCM UNets (``time_cond_proj_dim`` set):
    the guidance-embedding projection has no counterpart in a ControlNet and is left out.
    The conditioning embedding must downsample by the VAE factor:
    2 ** (len(conditioning_embedding_out_channels) - 1).
    """
    controlnet = ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        load_weights_from_unet=False,
        conditioning_channels=conditioning_channels,
    )
    controlnet.conv_in.load_state_dict(unet.conv_in.state_dict())
    time_state = {k: v for k, v in unet.time_embedding.state_dict().items() if not k.startswith("cond_proj.")}
    controlnet.time_embedding.load_state_dict(time_state)
    if getattr(unet, "add_embedding", None) is not None:  # SDXL: the pooled-text and time-id embedding
        controlnet.add_embedding.load_state_dict(unet.add_embedding.state_dict())
    controlnet.down_blocks.load_state_dict(unet.down_blocks.state_dict())
    controlnet.mid_block.load_state_dict(unet.mid_block.state_dict())
    if not zero_init_outputs:
        reinit_zero_convs(controlnet, generator=torch.Generator().manual_seed(0))
    return controlnet if controlnet.dtype == unet.dtype else controlnet.to(dtype=unet.dtype)


def reinit_zero_convs(controlnet: ControlNetModel, *, generator: torch.Generator, std: float = 0.02) -> None:
    """Give the zero-initialised output convolutions small random weights (tests, analyses)."""
    convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * std)


def controlnet_downsample_factor(controlnet: ControlNetModel) -> int:
    return 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)


def check_controlnet_fits(unet: UNet2DConditionModel, controlnet: ControlNetModel, *, vae_scale_factor: int, label: str = "ControlNet") -> None:
    """Raise IncompatibleModelsError naming the first config field where the pair disagrees."""
    for key in _SHARED_KEYS:
        u, c = unet.config.get(key), controlnet.config.get(key)
        if (list(u) if isinstance(u, (list, tuple)) else u) != (list(c) if isinstance(c, (list, tuple)) else c):
            raise IncompatibleModelsError(f"{label} does not fit the UNet: {key} is {c!r} in the ControlNet but {u!r} in the UNet")
    factor = controlnet_downsample_factor(controlnet)
    if factor != vae_scale_factor:
        raise IncompatibleModelsError(
            f"{label}'s conditioning embedding downsamples by {factor} but the VAE by {vae_scale_factor}; "
            "the control image would not line up with the latents"
        )
