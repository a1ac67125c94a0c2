"""The paper's analyses of why a DM's ControlNet transfers poorly to a CM, as tools.

- Correlation: feed two ControlNets (say the DM's and the CM's for one condition) the same noisy
  latents, prompts and control maps at several timesteps, and compare their residuals at each
  depth (every down-block output, then the mid block): the cosine similarity of the flattened
  residuals per sample and timestep (1: same direction, -1: opposite), and their radially
  averaged Fourier amplitude spectra (which frequencies each ControlNet injects).
- Reverse transfer (CM's ControlNet + DM) is the runner's ``cm-controlnet+dm`` method preset;
  ``reverse_transfer_method`` builds it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError, ShapeError
from ..models import controlled_unet
from .config import MethodConfig, PaperModels, preset_method
from .figures import save_figure


def reverse_transfer_method(paper: PaperModels) -> MethodConfig:
    """CM's ControlNet + DM: the CT-trained ControlNets on the diffusion model, sampled with DDIM and CFG."""
    return preset_method("cm-controlnet+dm", paper)


def residual_names(count: int) -> list[str]:
    """Names of a ControlNet's residuals: ``down_0`` .. ``down_{n-1}`` (input to bottleneck), then ``mid``."""
    return [f"down_{i}" for i in range(count - 1)] + ["mid"]


@torch.no_grad()
def controlnet_residuals(controlnet: nn.Module, latents: torch.Tensor, timestep: int, prompt_embeds: torch.Tensor,
                         control: torch.Tensor, *, conditioning_scale: float = 1.0) -> list[torch.Tensor]:  # fmt: skip
    """A diffusers ControlNet's residuals at ``timestep``: the down-block ones, then the mid block's."""
    down, mid = controlled_unet.controlnet_residuals(controlnet, latents, timestep, prompt_embeds, control, scale=conditioning_scale)
    return [*down, mid]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 [B]: cosine of the flattened per-sample tensors; NaN where either is all zero."""
    if a.shape != b.shape:
        raise ShapeError(f"cannot compare residuals of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.flatten(1).double(), b.flatten(1).double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    dot = (a * b).sum(dim=1)
    return torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.full_like(dot, float("nan")))


def radial_spectrum(maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies, amplitudes): the Fourier amplitude of [B, C, h, w] maps, averaged over B, C and rings.

    Ring k holds the frequencies at radius k / max(h, w) cycles per pixel (rounded), k = 0
    (the mean) .. max(h, w) // 2 (Nyquist); corners beyond Nyquist are left out.
    """
    if maps.ndim != 4:
        raise ShapeError(f"expected maps [B, C, h, w], got shape {tuple(maps.shape)}")
    h, w = maps.shape[-2:]
    amplitude = torch.fft.fft2(maps.double()).abs().mean(dim=(0, 1)).cpu().numpy()
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    side = max(h, w)
    rings = np.rint(np.sqrt(fx**2 + fy**2) * side).astype(int)
    count = side // 2 + 1
    keep = rings < count
    totals = np.bincount(rings[keep], weights=amplitude[keep], minlength=count)
    sizes = np.bincount(rings[keep], minlength=count)
    spectrum = np.divide(totals, sizes, out=np.full(count, np.nan), where=sizes > 0)
    return np.arange(count) / side, spectrum


@dataclass
class CorrelationResult:
    """Per residual depth: cosine similarity (mean, std over samples and timesteps) and both spectra."""

    names: list[str]
    cosine_mean: list[float]
    cosine_std: list[float]
    frequencies: list[np.ndarray]
    spectra_a: list[np.ndarray]
    spectra_b: list[np.ndarray]
    label_a: str = "A"
    label_b: str = "B"
    timesteps: list[int] = field(default_factory=list)
    num_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        as_list = lambda arrays: [np.asarray(a).tolist() for a in arrays]  # noqa: E731
        return {
            "label_a": self.label_a, "label_b": self.label_b, "timesteps": self.timesteps, "num_samples": self.num_samples,
            "names": self.names, "cosine_mean": self.cosine_mean, "cosine_std": self.cosine_std,
            "frequencies": as_list(self.frequencies), "spectra_a": as_list(self.spectra_a), "spectra_b": as_list(self.spectra_b),
        }  # fmt: skip

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True))
        return path

    def plot(self, path: str | os.PathLike) -> Path:
        """Cosine similarity per depth on top, one spectrum panel per depth below (log amplitude)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        depth = len(self.names)
        columns = min(4, depth)
        rows = 1 + -(-depth // columns)
        figure = plt.figure(figsize=(3.2 * columns, 2.6 * rows))
        grid = figure.add_gridspec(rows, columns)
        top = figure.add_subplot(grid[0, :])
        top.errorbar(range(depth), self.cosine_mean, yerr=self.cosine_std, marker="o", capsize=3)
        top.axhline(0, color="grey", lw=0.5)
        top.set_xticks(range(depth), self.names)
        top.set_ylim(-1.05, 1.05)
        top.set_ylabel("cosine similarity")
        top.set_title(f"{self.label_a} vs {self.label_b}: residuals per depth")
        for i, name in enumerate(self.names):
            axis = figure.add_subplot(grid[1 + i // columns, i % columns])
            for spectrum, label in ((self.spectra_a[i], self.label_a), (self.spectra_b[i], self.label_b)):
                axis.semilogy(self.frequencies[i], np.maximum(spectrum, 1e-12), marker=".", label=label)
            axis.set_title(name, fontsize=9)
            axis.set_xlabel("cycles / pixel", fontsize=8)
            if i == 0:
                axis.set_ylabel("amplitude", fontsize=8)
                axis.legend(fontsize=7)
        return save_figure(figure, path)


@torch.no_grad()
def compare_controlnets(
    controlnet_a: nn.Module,
    controlnet_b: nn.Module,
    *,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    controls: torch.Tensor,
    timesteps: Sequence[int],
    schedule,
    seed: int = 0,
    label_a: str = "A",
    label_b: str = "B",
) -> CorrelationResult:
    """Compare two ControlNets' residuals on clean ``latents`` noised to each of ``timesteps``.

    Both see the same noise (seeded), prompt embeddings and control maps. ``schedule`` is a
    ``NoiseSchedule`` (``pipeline.schedule``).
    """
    if not timesteps:
        raise InputError("expected at least one timestep for the correlation analysis")
    if not (latents.shape[0] == prompt_embeds.shape[0] == controls.shape[0]):
        raise ShapeError(
            f"latents, prompt embeddings and controls need one batch size, got {latents.shape[0]}, "
            f"{prompt_embeds.shape[0]} and {controls.shape[0]}"
        )
    generator = torch.Generator().manual_seed(seed)
    cosines: list[list[torch.Tensor]] = []
    spectra_a: list[np.ndarray] = []
    spectra_b: list[np.ndarray] = []
    frequencies: list[np.ndarray] = []
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        noisy = schedule.add_noise(latents, noise, int(t))
        res_a = controlnet_residuals(controlnet_a, noisy, int(t), prompt_embeds, controls)
        res_b = controlnet_residuals(controlnet_b, noisy, int(t), prompt_embeds, controls)
        if len(res_a) != len(res_b):
            raise ShapeError(f"the ControlNets give {len(res_a)} and {len(res_b)} residuals; they must share an architecture")
        if not cosines:
            cosines = [[] for _ in res_a]
            frequencies = [radial_spectrum(r)[0] for r in res_a]
            spectra_a, spectra_b = [np.zeros(len(f)) for f in frequencies], [np.zeros(len(f)) for f in frequencies]
        for i, (a, b) in enumerate(zip(res_a, res_b)):
            cosines[i].append(cosine_similarity(a, b))
            spectra_a[i] = spectra_a[i] + radial_spectrum(a)[1]
            spectra_b[i] = spectra_b[i] + radial_spectrum(b)[1]
    values = [torch.cat(c) for c in cosines]
    return CorrelationResult(
        names=residual_names(len(values)),
        cosine_mean=[float(np.nanmean(v.numpy())) if torch.isfinite(v).any() else float("nan") for v in values],
        cosine_std=[float(np.nanstd(v.numpy())) if torch.isfinite(v).any() else float("nan") for v in values],
        frequencies=frequencies,
        spectra_a=[s / len(timesteps) for s in spectra_a],
        spectra_b=[s / len(timesteps) for s in spectra_b],
        label_a=label_a,
        label_b=label_b,
        timesteps=[int(t) for t in timesteps],
        num_samples=int(latents.shape[0]),
    )


def correlation_analysis(
    pipeline,
    controlnet_a,
    controlnet_b,
    *,
    images: torch.Tensor,
    captions: Sequence[str],
    controls: torch.Tensor,
    timesteps: Sequence[int] = (999, 749, 499, 249),
    seed: int = 0,
    label_a: str = "A",
    label_b: str = "B",
) -> CorrelationResult:
    """``compare_controlnets`` on real data: ``images`` encoded by ``pipeline``'s VAE, ``captions`` by its text encoder.

    ``controlnet_a``/``_b`` are ControlNet models or anything ``load_controlnet`` takes.
    """
    from ..pipeline import load_controlnet

    if not (images.shape[0] == len(captions) == controls.shape[0]):
        raise ShapeError(f"expected one caption and control map per image, got {images.shape[0]}, {len(captions)}, {controls.shape[0]}")
    nets = []
    for source in (controlnet_a, controlnet_b):
        net = load_controlnet(source)
        if net.device != pipeline.device or net.dtype != pipeline.dtype:
            net = net.to(device=pipeline.device, dtype=pipeline.dtype)
        nets.append(net.eval())
    net_a, net_b = nets
    height, width = images.shape[-2:]
    latents = pipeline.encode_image(images, height=height, width=width, batch=images.shape[0])
    embeds, _ = pipeline.encode_prompt(list(captions))
    return compare_controlnets(
        net_a, net_b, latents=latents, prompt_embeds=embeds, controls=controls.to(pipeline.device, pipeline.dtype),
        timesteps=timesteps, schedule=pipeline.schedule, seed=seed, label_a=label_a, label_b=label_b,
    )  # fmt: skip
