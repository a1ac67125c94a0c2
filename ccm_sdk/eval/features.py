"""Feature extractors for FID: the protocol, batched extraction, and extractors chosen by name.

A ``FeatureExtractor`` maps images [B, 3, H, W] in [0, 1] to features [B, D]. Extractors are a
plugin kind: ``register_feature_extractors`` registers factories ``factory(config, *, device)``
that build one from a :class:`FeatureConfig`, and an eval config's ``features.kind`` names one.
Built in (``ccm_sdk/builtin/feature_extractors.py``):

- ``inception``: the FID Inception-v3 (pool3, 2048-D) loaded from a converted folder, the
  standard for FIDs comparable with published ones (``inception.py``);
- ``feature-net``: a small CNN trained on a domain's attributes (``feature_net.py``), for small
  images (the world) where Inception's ImageNet features say little;
- ``pixels``: the image box-downsampled to ``size`` x ``size`` and flattened: a weak, model-free
  feature, useful to check plumbing; its FIDs are not comparable with Inception FIDs.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from .. import images as image_utils
from ..errors import InputError, NonFiniteError, ShapeError, UnknownNameError
from ..interfaces import Options


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images [B, 3, H, W] in [0, 1] -> features [B, D]."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class PixelExtractor:
    """The image averaged down to ``size`` x ``size`` pixels, flattened: 3 * size^2 features."""

    def __init__(self, size: int = 8):
        if size < 1:
            raise ShapeError(f"expected a pixel-feature size >= 1, got {size}")
        self.size = size
        self.name = f"pixels-{size}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


class ModuleExtractor:
    """Any ``torch.nn.Module`` mapping [B, 3, H, W] in [0, 1] to [B, D] (or [B, D, 1, 1])."""

    def __init__(self, module: torch.nn.Module, *, name: str = "module", device: torch.device | str | None = None):
        self.module = module.eval() if device is None else module.to(device).eval()
        self.name = name

    @property
    def device(self) -> torch.device:
        parameter = next(self.module.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.to(self.device)).flatten(1).float().cpu()


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Run ``extractor`` over ``images`` [N, 3, H, W] in [0, 1] in batches -> float64 [N, D] on the CPU."""
    image_utils.check_image_tensor(images, channels=3, name="images for feature extraction")
    if batch_size < 1:
        raise ShapeError(f"expected batch_size >= 1, got {batch_size}")
    parts = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        features = extractor(batch)
        if features.ndim != 2 or features.shape[0] != batch.shape[0]:
            raise ShapeError(
                f"feature extractor {getattr(extractor, 'name', extractor)!r} returned shape {tuple(features.shape)} "
                f"for {batch.shape[0]} images; expected [{batch.shape[0]}, D]"
            )
        parts.append(features.detach().double().cpu())
    features = torch.cat(parts)
    if not torch.isfinite(features).all():
        raise NonFiniteError(f"feature extractor {getattr(extractor, 'name', extractor)!r} produced NaN or infinite features")
    return features


class FeatureConfig(Options):
    """Which extractor FID uses (an eval config's ``features`` section)."""

    kind: str = Field(default="pixels", description="a registered feature extractor: pixels, inception, feature-net or a plugin's")
    path: str | None = Field(default=None, description="the converted Inception or trained feature-net folder")
    size: int = Field(default=8, ge=1, description="pixels: the side the image is averaged down to")
    batch_size: int = Field(default=64, ge=1)

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        from ..registry import feature_extractors

        if kind not in feature_extractors:
            # a ValueError, so that pydantic reports it at features.kind
            raise ValueError(str(UnknownNameError("feature extractor", kind, feature_extractors.names())))
        return kind


def model_folder(config: FeatureConfig) -> str:
    """``config.path``, for the extractors that load a model; InputError when it is not set."""
    if config.path is None:
        raise InputError(f"features of kind {config.kind!r} need a 'path' to the model folder")
    return config.path


def load_extractor(config: FeatureConfig | dict[str, Any], *, device: torch.device | str = "cpu") -> FeatureExtractor:
    """Build the extractor a ``FeatureConfig`` names, with the factory registered as its ``kind``."""
    from ..interfaces import build_options
    from ..registry import feature_extractors

    config = config if isinstance(config, FeatureConfig) else build_options(FeatureConfig, "features", config)
    return feature_extractors.get(config.kind)(config, device=device)
