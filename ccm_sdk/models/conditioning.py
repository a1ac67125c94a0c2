"""What the UNet and its ControlNets are conditioned on besides (x, t), for every model family.

Stable Diffusion 1.x/2.x conditions on the text encoder's hidden states alone. SDXL adds the
pooled text embedding of its second encoder and the size/crop "time ids" (diffusers'
``added_cond_kwargs = {"text_embeds": ..., "time_ids": ...}``), which its UNet and its
ControlNets both take. :class:`Conditioning` carries either, so the controlled UNet and the
denoiser are one code path for both families: a plain tensor stands for SD's hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """Text hidden states (``encoder_hidden_states``) plus, for SDXL, ``added_cond_kwargs``."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    @property
    def batch(self) -> int:
        return int(self.encoder_hidden_states.shape[0])


def as_conditioning(value: torch.Tensor | Conditioning) -> Conditioning:
    """``value`` as a :class:`Conditioning`; a tensor is Stable Diffusion's text hidden states."""
    return value if isinstance(value, Conditioning) else Conditioning(value)


def cat_conditioning(items: Sequence[torch.Tensor | Conditioning]) -> Conditioning:
    """Concatenate along the batch (classifier-free guidance puts the negative half first)."""
    parts = [as_conditioning(item) for item in items]
    hidden = torch.cat([p.encoder_hidden_states for p in parts])
    if all(p.added_cond_kwargs is None for p in parts):
        return Conditioning(hidden)
    if any(p.added_cond_kwargs is None for p in parts) or len({tuple(sorted(p.added_cond_kwargs)) for p in parts}) != 1:
        raise ValueError("cannot concatenate conditionings whose added_cond_kwargs differ in their keys")
    keys = parts[0].added_cond_kwargs
    return Conditioning(hidden, {k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in keys})
