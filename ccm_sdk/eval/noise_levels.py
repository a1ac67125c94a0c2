"""How well one consistency step recovers the data from each noise level, with and without control;
and how self-consistent the model is at each level (the consistency-training loss, held out).

Noise real images to the timestep an img2img ``strength`` picks, apply the consistency function
once (the pipeline's img2img with one step), decode, and take the mean absolute difference to the
images. For a consistency model that error grows with the noise level; a ControlNet that carries
information about the image (its control map) should lower it at every level, and one that does
not can only raise it. It shows where along the trajectory a consistency-trained ControlNet has
learned anything: consistency training propagates from the low-noise end outward.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ShapeError
from ..registry import get_sampler
from .figures import save_figure


@dataclass
class NoiseLevelCurve:
    """One model's error per noise level (timestep): ``metric`` says which error."""

    label: str
    timesteps: list[int]
    errors: list[float]
    metric: str = "reconstruction"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "metric": self.metric, "timesteps": self.timesteps, "errors": self.errors}


@torch.no_grad()
def error_by_noise_level(
    pipe,
    prompts: Sequence[str],
    images: torch.Tensor,
    strengths: Sequence[float],
    *,
    control_image: torch.Tensor | None = None,
    label: str = "model",
    seed: int = 0,
    batch_size: int = 64,
) -> NoiseLevelCurve:
    """One-step reconstruction error of ``pipe`` at each strength (same noise for every strength).

    ``images`` [B, 3, H, W] in [0, 1] with one prompt each; ``control_image`` [B, C, H, W] for a
    pipeline with a ControlNet. Batches of ``batch_size`` keep memory flat.
    """
    _check(prompts, images, control_image, batch_size)
    if not strengths or any(not 0 < s <= 1 for s in strengths):
        raise InputError(f"expected strengths in (0, 1], got {list(strengths)}")
    sampler = get_sampler("consistency")
    timesteps = [int(sampler.timesteps(pipe.schedule, 1, float(s))[0]) for s in strengths]
    errors = []
    for strength in strengths:
        total = 0.0
        for start in range(0, images.shape[0], batch_size):
            stop = start + batch_size
            control = {} if control_image is None else {"control_image": control_image[start:stop]}
            out = pipe(list(prompts[start:stop]), image=images[start:stop], strength=float(strength), num_inference_steps=1,
                       generator=torch.Generator().manual_seed(seed + start), output_type="pt", **control).images  # fmt: skip
            total += (out.float().cpu() - images[start:stop].float()).abs().mean(dim=(1, 2, 3)).sum().item()
        errors.append(total / images.shape[0])
    return NoiseLevelCurve(label=label, timesteps=timesteps, errors=errors)


@torch.no_grad()
def consistency_error_by_level(
    pipe,
    prompts: Sequence[str],
    images: torch.Tensor,
    grid_indices: Sequence[int],
    *,
    control_image: torch.Tensor | None = None,
    label: str = "model",
    num_points: int = 50,
    guidance_scale: float = 8.0,
    seed: int = 0,
    batch_size: int = 64,
) -> NoiseLevelCurve:
    """The consistency-training loss, held out: mean |f(x_{t_{n+1}}) - f(x_{t_n})| per grid index n.

    Both points come from the same images' latents (the VAE posterior mean) and one seeded noise,
    on the N-point skipping grid that consistency training uses; f runs the pipeline's own
    denoiser (ControlNets, adapter, w-embedding for ``guidance_scale``). Reported at t_{n+1}, in
    latent units: lower is more self-consistent.
    """
    from ..models.denoiser import ControlledDenoiser, ControlSpec
    from ..training import grid_timesteps

    _check(prompts, images, control_image, batch_size)
    if not grid_indices or any(not 0 <= n <= num_points - 2 for n in grid_indices):
        raise InputError(f"expected grid indices in 0..{num_points - 2}, got {list(grid_indices)}")
    if control_image is not None and len(pipe.controlnets) != 1:
        raise InputError(f"one control map batch fits a pipeline with one ControlNet, this one has {len(pipe.controlnets)}")
    height, width = images.shape[-2:]
    pairs = [tuple(int(t) for t in grid_timesteps(pipe.schedule, num_points, torch.tensor([n]))) for n in grid_indices]
    totals = [0.0] * len(pairs)
    for start in range(0, images.shape[0], batch_size):
        stop = min(start + batch_size, images.shape[0])
        count = stop - start
        latents = pipe.encode_image(images[start:stop], height=height, width=width, batch=count)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + start)).to(latents)
        prompt = pipe.prepare_prompt(list(prompts[start:stop]), guidance_scale=guidance_scale, num_images_per_prompt=1,
                                     do_cfg=guidance_scale > 1.0 and not pipe.is_lcm)  # fmt: skip
        specs = [] if control_image is None else [
            ControlSpec(pipe.controlnets[0], pipe.prepare_control_image(control_image[start:stop], pipe.controlnets[0],
                                                                         height=height, width=width, batch=count))
        ]  # fmt: skip
        positive, negative = pipe._conditioning(prompt, size=(height, width), micro=None)  # SDXL: + pooled embeds, time ids
        denoiser = ControlledDenoiser(pipe.unet, prompt_embeds=positive, negative_embeds=negative,
                                      guidance_scale=guidance_scale, timestep_cond=prompt.timestep_cond, controls=specs,
                                      adapter=pipe.adapter if specs else None)  # fmt: skip

        def f(t: int) -> torch.Tensor:
            x = pipe.schedule.add_noise(latents, noise, t)
            return pipe.schedule.consistency(denoiser(x, t).float(), x.float(), t)[0]

        with denoiser.session():
            for i, (low, high) in enumerate(pairs):
                totals[i] += (f(high) - f(low)).abs().mean(dim=(1, 2, 3)).sum().item()
    errors = [total / images.shape[0] for total in totals]
    return NoiseLevelCurve(label=label, timesteps=[high for _, high in pairs], errors=errors, metric="consistency")


def _check(prompts: Sequence[str], images: torch.Tensor, control_image: torch.Tensor | None, batch_size: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise InputError(f"expected one prompt per image ({images.shape[0]}), got {len(prompts)}")
    if control_image is not None and control_image.shape[0] != images.shape[0]:
        raise ShapeError(f"expected one control map per image ({images.shape[0]}), got {control_image.shape[0]}")
    if batch_size < 1:
        raise InputError(f"expected batch_size >= 1, got {batch_size}")


def save_curves(curves: Sequence[NoiseLevelCurve], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([c.to_dict() for c in curves], indent=2))
    return path


def markdown_table(curves: Sequence[NoiseLevelCurve]) -> str:
    """One row per model, one column per timestep: the error, then its ratio to the first curve's."""
    if not curves:
        raise InputError("expected at least one curve")
    first = curves[0]
    if any(c.timesteps != first.timesteps for c in curves):
        raise InputError("the curves were measured at different timesteps; measure them with the same strengths")
    head = "| model | " + " | ".join(f"t={t}" for t in first.timesteps) + " |"
    rows = [head, "|---|" + "---|" * len(first.timesteps)]
    for curve in curves:
        cells = [f"{e:.4f}" if curve is first else f"{e:.4f} ({e / b:.2f}x)" for e, b in zip(curve.errors, first.errors)]
        rows.append(f"| {curve.label} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot_curves(curves: Sequence[NoiseLevelCurve], path: str | os.PathLike, *, title: str = "") -> Path:
    """Error against timestep, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for curve in curves:
        axis.plot(curve.timesteps, curve.errors, marker="o", label=curve.label)
    consistency = curves[0].metric == "consistency" if curves else False
    axis.set_xlabel("t_{n+1} of the grid pair" if consistency else "timestep t of the noised input")
    axis.set_ylabel("mean |f(x_{t_{n+1}}) - f(x_{t_n})| (latents)" if consistency else "mean |f(x_t) - x| (decoded, [0, 1])")
    axis.set_title(title or ("consistency error per grid pair" if consistency else "one consistency step from each noise level"))
    axis.legend(fontsize=8)
    return save_figure(figure, path)
