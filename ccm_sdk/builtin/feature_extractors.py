"""Built-in FID feature extractors: ``pixels``, ``inception`` (the FID Inception-v3) and ``feature-net``."""

from __future__ import annotations

import torch

from ..eval.features import FeatureConfig, FeatureExtractor, PixelExtractor, model_folder
from ..hookspecs import hookimpl


def pixels(config: FeatureConfig, *, device: torch.device | str = "cpu") -> FeatureExtractor:
    """The image averaged down to ``config.size`` squared pixels: model-free, for plumbing checks."""
    return PixelExtractor(config.size)


def inception(config: FeatureConfig, *, device: torch.device | str = "cpu") -> FeatureExtractor:
    """pool3 of the FID Inception-v3 from a converted folder: FIDs comparable with published ones."""
    from ..eval.inception import InceptionExtractor

    return InceptionExtractor.from_pretrained(model_folder(config), device=device)


def feature_net(config: FeatureConfig, *, device: torch.device | str = "cpu") -> FeatureExtractor:
    """A small CNN trained on a domain's attributes (small images where Inception says little)."""
    from ..eval.feature_net import FeatureNetExtractor

    return FeatureNetExtractor.from_pretrained(model_folder(config), device=device)


@hookimpl
def register_feature_extractors(register):
    register(pixels, name="pixels")
    register(inception, name="inception")
    register(feature_net, name="feature-net")
