"""The controlled UNet: ControlNet residuals -> unified adapter (optional) -> UNet, in one place.

Inference (``ControlledDenoiser``), every trainer that puts ControlNets in front of a UNet and
the residual analysis all compose the networks through these functions, so what a ControlNet
learns in training is what it does at inference:

- each ControlNet runs at ``conditioning_scale = scale``; with an adapter it runs at scale 1,
  the adapter transforms its own residuals, and the adapted residuals are then scaled;
- the residuals of several ControlNets are summed, first ControlNet first (as diffusers'
  MultiControlNetModel sums them);
- the UNet gets the sum as ``down_block_additional_residuals`` / ``mid_block_additional_residual``,
  with the text embeddings and ``timestep_cond`` (an LCM's w-embedding, or None).

The text conditioning is a tensor of hidden states (Stable Diffusion 1.x/2.x) or a
:class:`~ccm_sdk.models.conditioning.Conditioning`, whose ``added_cond_kwargs`` (SDXL's pooled
text embedding and time ids) go to every ControlNet and to the UNet alike.

Gradients flow through everything unless ``controlnet_grad=False``, which runs the ControlNets
under ``torch.no_grad()`` (frozen ones, whose graph nobody needs) while the adapter and the UNet
keep theirs. A caller that wants no graph at all wraps the call in ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .conditioning import Conditioning, as_conditioning


class Control(NamedTuple):
    """One ControlNet's input for one call: the network, its control image and its scale."""

    controlnet: nn.Module
    image: torch.Tensor  # [B, C, H, W] in [0, 1], batch matched to the latents
    scale: float = 1.0


Residuals = tuple[list[torch.Tensor], torch.Tensor]


def controlnet_residuals(
    controlnet: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor | Conditioning,
    image: torch.Tensor,
    *,
    scale: float = 1.0,
    adapter: nn.Module | None = None,
    controlnet_grad: bool = True,
) -> Residuals:
    """One ControlNet's (down residuals, mid residual) at ``scale``, adapted before scaling when an adapter is given."""
    cond = as_conditioning(encoder_hidden_states)
    with contextlib.nullcontext() if controlnet_grad else torch.no_grad():
        down, mid = controlnet(
            x, t, encoder_hidden_states=cond.encoder_hidden_states, controlnet_cond=image,
            conditioning_scale=1.0 if adapter is not None else scale, added_cond_kwargs=cond.added_cond_kwargs, return_dict=False,
        )  # fmt: skip
    if adapter is None:
        return list(down), mid
    down, mid = adapter(down, mid)
    if scale != 1.0:  # r * 1.0 == r exactly: skip the multiplications
        down, mid = [r * scale for r in down], mid * scale
    return list(down), mid


def summed_residuals(
    controls: Sequence[Control],
    x: torch.Tensor,
    t: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor | Conditioning,
    *,
    adapter: nn.Module | None = None,
    controlnet_grad: bool = True,
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """The residuals of all ``controls`` summed, each adapted on its own when an adapter is given.

    (None, None) without controls, which the UNet reads as "no control".
    """
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for controlnet, image, scale in controls:
        d, m = controlnet_residuals(
            controlnet, x, t, encoder_hidden_states, image, scale=scale, adapter=adapter, controlnet_grad=controlnet_grad
        )
        if down is None:
            down, mid = d, m
        else:
            down = [a + b for a, b in zip(down, d)]
            mid = mid + m
    return down, mid


def controlled_unet(
    unet: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor | Conditioning,
    controls: Sequence[Control] = (),
    *,
    adapter: nn.Module | None = None,
    timestep_cond: torch.Tensor | None = None,
    controlnet_grad: bool = True,
) -> torch.Tensor:
    """The UNet's output (its raw prediction) at (x, t) under the summed, optionally adapted, ControlNet residuals."""
    cond = as_conditioning(encoder_hidden_states)
    down, mid = summed_residuals(controls, x, t, cond, adapter=adapter, controlnet_grad=controlnet_grad)
    return unet(
        x, t, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=timestep_cond, added_cond_kwargs=cond.added_cond_kwargs,
        down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
    )[0]  # fmt: skip
