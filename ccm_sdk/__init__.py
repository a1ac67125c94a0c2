"""ccm-sdk: real-time, controllable image generation with text-to-image consistency models."""

from .hookspecs import hookimpl
from .registry import get_condition, get_sampler
from .version import __version__

__all__ = ["__version__", "hookimpl", "get_condition", "get_sampler"]
