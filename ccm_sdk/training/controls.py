"""Control maps and ControlNets for training: maps from the data or from a condition plugin."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from pydantic import Field

from ..conditions.mask import MaskCondition, random_masks
from ..errors import ChannelMismatchError
from ..interfaces import Condition, build_options
from ..models.conditioning import Conditioning
from ..models.controlnet import check_controlnet_fits, controlnet_from_unet
from ..pipeline import CCMPipeline, load_controlnet
from ..registry import conditions
from ..utils.atomic import atomic_folder
from .config import TrainConfig
from .core import Trainer
from .frozen import FrozenBase, freeze, pipeline_like, place


class ControlNetTrainConfig(TrainConfig):
    """Fields of the two trainers that train one ControlNet."""

    condition: str = Field(default="canny", description="condition plugin that makes control maps missing from the data")
    condition_options: dict[str, Any] = Field(default_factory=dict)
    controlnet: str | None = Field(default=None, description="initial ControlNet folder; None: copy the UNet's encoder")
    conditioning_embedding_out_channels: tuple[int, ...] = Field(
        default=(16, 32, 96, 256), description="a new ControlNet's control-image encoder; must downsample by the VAE factor"
    )


class ControlSource:
    """The control maps of one condition for a batch: the dataset's precomputed maps under ``key``
    where a sample has one, the condition plugin's output for the others.

    A condition named by a string is built on first use, so data that brings every map (e.g. the
    world's exact depth and pose) needs no detector model; its options are validated at once.
    """

    def __init__(self, condition: str | Condition, *, key: str, options: dict[str, Any] | None = None):
        if isinstance(condition, str):
            self.condition_class = conditions.get(condition)
            self.options = dict(options or {})
            build_options(self.condition_class.Options, f"condition {condition!r}", self.options)
            self._condition: Condition | None = None
        else:
            self.condition_class, self.options, self._condition = type(condition), {}, condition
        self.key = key

    @property
    def condition(self) -> Condition:
        """The condition plugin (built now if it was named and not used yet)."""
        if self._condition is None:
            self._condition = self.condition_class(**self.options)
        return self._condition

    @property
    def name(self) -> str:
        return self.condition_class.name

    @property
    def channels(self) -> int:
        return self.condition_class.channels

    def _fit_channels(self, control: torch.Tensor, index: int) -> torch.Tensor:
        if control.shape[0] == self.channels:
            return control
        if control.shape[0] == 1 and self.channels == 3:  # grayscale maps (edges) saved as single-channel PNGs
            return control.expand(3, -1, -1)
        raise ChannelMismatchError(
            f"precomputed control map {self.key!r} of sample {index} has {control.shape[0]} channels, "
            f"but condition {self.name!r} makes {self.channels}"
        )

    def maps(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, C, H, W] in [0, 1], on the CPU."""
        images = batch["images"]
        given = batch["controls"].get(self.key) or [None] * images.shape[0]
        missing = [i for i, control in enumerate(given) if control is None]
        out = [None if control is None else self._fit_channels(control, i) for i, control in enumerate(given)]
        if missing:
            kwargs = {}
            if isinstance(self.condition, MaskCondition):
                # inpainting maps need a mask; draw one from the training RNG so resumes repeat it
                seed = int(torch.randint(2**31 - 1, ()))
                kwargs["mask"] = random_masks(len(missing), *images.shape[-2:], seed=seed)
            computed = self.condition(images[missing], **kwargs)
            for i, control in zip(missing, computed):
                out[i] = control
        return torch.stack(out).float()


def check_condition_fits(controlnet: ControlNetModel, source: ControlSource, *, label: str = "ControlNet") -> None:
    """ChannelMismatchError unless the ControlNet takes as many channels as the condition makes."""
    expected = controlnet.config.conditioning_channels
    if expected != source.channels:
        raise ChannelMismatchError(
            f"{label} takes {expected} conditioning channels but condition {source.name!r} makes {source.channels}; "
            f"train a ControlNet with conditioning_channels={source.channels} (leave 'controlnet' unset) or pick a matching condition"
        )


def build_controlnet(
    unet: UNet2DConditionModel,
    source: ControlSource,
    *,
    init: str | None,
    conditioning_embedding_out_channels: tuple[int, ...],
    vae_scale_factor: int,
) -> ControlNetModel:
    """A float32 ControlNet to train: loaded from ``init``, or copied from the UNet's encoder."""
    if init is not None:
        controlnet = load_controlnet(init)
    else:
        controlnet = controlnet_from_unet(
            unet, conditioning_channels=source.channels, conditioning_embedding_out_channels=conditioning_embedding_out_channels
        )
    place(controlnet, "cpu", torch.float32)
    label = f"ControlNet {init!r}" if init else "the new ControlNet"
    check_controlnet_fits(unet, controlnet, vae_scale_factor=vae_scale_factor, label=label)
    check_condition_fits(controlnet, source, label=label)
    return controlnet


@dataclass
class ControlInputs:
    """A batch encoded for ControlNet training."""

    latents: torch.Tensor
    embeds: torch.Tensor | Conditioning  # SDXL: with the pooled embeddings and time ids
    control: torch.Tensor  # [B, C, H, W] in [0, 1]


class ControlNetTrainer(Trainer):
    """Shared set-up of the two trainers that train one ControlNet on a frozen UNet."""

    config: ControlNetTrainConfig

    def check_base(self, pipe: CCMPipeline) -> None:
        """Raise if the base model is of the wrong kind for this trainer."""

    def build(self) -> ControlNetModel:
        cfg = self.config
        pipe = CCMPipeline.from_pretrained(cfg.model)
        self.check_base(pipe)
        self.base = FrozenBase(pipe, device=self.device, weight_dtype=self.weight_dtype)
        self.unet = pipe.unet
        self.control = ControlSource(cfg.condition, key=cfg.data.control_key, options=cfg.condition_options)
        controlnet = build_controlnet(
            self.unet,  # still float32: a new ControlNet copies its weights
            self.control,
            init=cfg.controlnet,
            conditioning_embedding_out_channels=cfg.conditioning_embedding_out_channels,
            vae_scale_factor=pipe.vae_scale_factor,
        )
        controlnet.requires_grad_(True)
        freeze(self.unet)
        place(self.unet, self.device, self.weight_dtype)
        self.enable_gradient_checkpointing(controlnet, self.unet)
        return controlnet

    def control_keys(self) -> list[str]:
        return [self.config.data.control_key]

    def prepare_inputs(self, batch: dict[str, Any]) -> ControlInputs:
        return ControlInputs(
            latents=self.base.encode_batch(batch),
            embeds=self.base.conditioning(batch, dropout=self.config.data.caption_dropout),
            control=self.control.maps(batch).to(self.device),
        )

    validation_sampler: dict[str, Any] = {"consistency": False, "guidance_scale": 7.5}

    def validation_pipeline(self) -> CCMPipeline:
        """The frozen base model with the ControlNet being trained."""
        return pipeline_like(self.base.pipe, unet=self.unet, controlnets=[self.unwrapped()])

    def validation_rows(self, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        control = self.control.maps(batch).to(self.device)
        images = self.sample_images(self.validation_pipeline(), batch, control=control, **self.validation_sampler)
        return [("control", control), ("generated", images), ("data", batch["images"])]

    def save_outputs(self, output_dir: Path) -> dict[str, Path]:
        path = output_dir / "controlnet"
        with atomic_folder(path) as tmp:
            self.unwrapped().save_pretrained(tmp, safe_serialization=True)
        return {"controlnet": path}
