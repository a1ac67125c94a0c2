"""A local web app for interactive sketch-to-image generation: ``ccm serve``.

One process keeps the pipeline loaded, so each drawing or prompt change costs only the
generation itself (a few network calls), not the seconds of importing torch and diffusers.
"""

from .server import GenerateRequest, GenerationService, make_server

__all__ = ["GenerateRequest", "GenerationService", "make_server"]
