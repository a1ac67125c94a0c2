"""ccm-sdk: real-time, controllable image generation with text-to-image consistency models."""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402
from .registry import get_condition, get_sampler  # noqa: E402

__all__ = ["__version__", "hookimpl", "get_condition", "get_sampler"]
