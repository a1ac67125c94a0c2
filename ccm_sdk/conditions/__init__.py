"""Built-in (light, OpenCV/torch-only) conditions; model-backed ones are plugins under plugins/."""

from .canny import CannyCondition
from .mask import MaskCondition, random_masks, to_diffusers_inpaint
from .sketch import SketchCondition
from .sr import SRCondition

BUILTIN_CONDITIONS: tuple = (CannyCondition, SketchCondition, MaskCondition, SRCondition)

__all__ = [
    "BUILTIN_CONDITIONS",
    "CannyCondition",
    "MaskCondition",
    "SRCondition",
    "SketchCondition",
    "random_masks",
    "to_diffusers_inpaint",
]
