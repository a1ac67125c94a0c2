"""The network a sampler calls: UNet + ControlNet residuals (+ adapter) (+ classifier-free guidance).

``ControlledDenoiser(x, t) -> raw prediction`` follows diffusers' StableDiffusionControlNetPipeline
operation for operation, so outputs match it, with two exact shortcuts: each ControlNet's
conditioning-image embedding is computed once per generation instead of at every step, and a
ControlNet whose scale is zero at a step is not run. For SDXL it follows
StableDiffusionXLControlNetPipeline: the prompt is a :class:`~ccm_sdk.models.conditioning.Conditioning`
whose ``added_cond_kwargs`` reach the ControlNets and the UNet.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .conditioning import Conditioning, as_conditioning, cat_conditioning
from .controlled_unet import Control, controlled_unet


@dataclass
class ControlSpec:
    """One ControlNet's input for a generation."""

    controlnet: nn.Module
    image: torch.Tensor  # [B, C, H, W] in [0, 1], batch already matched to the latents
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass
class DenoiserStats:
    nfe: int = 0  # UNet evaluations per sample (a CFG step counts two)
    unet_calls: int = 0
    controlnet_calls: int = 0
    forward_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)


class _PrecomputedEmbedding(nn.Module):
    """Stands in for a ControlNet's conditioning embedding while its input stays the same tensor."""

    def __init__(self, inner: nn.Module, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.inner, self.key, self.value = inner, key, value

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.value if cond is self.key else self.inner(cond)


class ControlledDenoiser:
    """Callable ``(x, t) -> model output`` for one generation (fixed prompt, controls, guidance)."""

    def __init__(
        self,
        unet: nn.Module,
        *,
        prompt_embeds: torch.Tensor | Conditioning,
        negative_embeds: torch.Tensor | Conditioning | None = None,
        guidance_scale: float = 1.0,
        timestep_cond: torch.Tensor | None = None,
        controls: Sequence[ControlSpec] = (),
        adapter: nn.Module | None = None,
        timesteps: Sequence[int] = (),
        cache_control_embedding: bool = True,
    ):
        self.unet, self.adapter, self.guidance_scale = unet, adapter, guidance_scale
        self.do_cfg = negative_embeds is not None
        # the UNet's text conditioning, negative half first under CFG
        self.conditioning = cat_conditioning([negative_embeds, prompt_embeds]) if self.do_cfg else as_conditioning(prompt_embeds)
        self.embeds = self.conditioning.encoder_hidden_states
        self.timestep_cond = timestep_cond
        self.controls = list(controls)
        self.control_images = [torch.cat([c.image] * 2) if self.do_cfg else c.image for c in self.controls]
        self.cache_control_embedding = cache_control_embedding
        self.stats = DenoiserStats()
        n = len(timesteps)
        # diffusers' control_guidance_start/end rule, keyed by timestep instead of step index
        self.keep = {
            int(t): [1.0 - float(i / n < c.start or (i + 1) / n > c.end) for c in self.controls] for i, t in enumerate(timesteps)
        }

    @contextlib.contextmanager
    def session(self):
        """Precompute ControlNet conditioning embeddings for the duration of a sampling run."""
        swapped = []
        try:
            if self.cache_control_embedding:
                with torch.no_grad():
                    for control, image in zip(self.controls, self.control_images):
                        net = control.controlnet
                        inner = net.controlnet_cond_embedding
                        if isinstance(inner, _PrecomputedEmbedding):
                            continue  # the same ControlNet given twice: keep the first cache
                        net.controlnet_cond_embedding = _PrecomputedEmbedding(inner, image, inner(image))
                        swapped.append((net, inner))
            yield self
        finally:
            for net, inner in swapped:
                net.controlnet_cond_embedding = inner

    def controls_at(self, t: int) -> list[Control]:
        """The ControlNets that run at timestep ``t``, with their scales there (zero-scale ones are left out)."""
        keep = self.keep.get(int(t), [1.0] * len(self.controls))
        steps = [Control(c.controlnet, image, c.scale * k) for c, image, k in zip(self.controls, self.control_images, keep)]
        return [control for control in steps if control.scale != 0.0]

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        start = time.perf_counter()
        x_in = torch.cat([x] * 2) if self.do_cfg else x
        controls = self.controls_at(t)
        self.stats.controlnet_calls += len(controls)
        output = controlled_unet(self.unet, x_in, t, self.conditioning, controls, adapter=self.adapter, timestep_cond=self.timestep_cond)
        self.stats.unet_calls += 1
        self.stats.nfe += 2 if self.do_cfg else 1
        if self.do_cfg:
            uncond, cond = output.chunk(2)
            output = uncond + self.guidance_scale * (cond - uncond)
        self.stats.forward_seconds += time.perf_counter() - start
        return output
