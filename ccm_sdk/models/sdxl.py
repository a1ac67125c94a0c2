"""The SDXL model family: how it is recognised, and its size/crop micro-conditioning.

An SDXL model has two text encoders (``text_encoder``: a CLIPTextModel, ``text_encoder_2``: a
CLIPTextModelWithProjection) and a UNet whose ``addition_embed_type`` is ``"text_time"``: besides
the text hidden states it takes the pooled text embedding of the second encoder and six "time
ids" (original size, top-left crop coordinates, target size), as diffusers' SDXL pipelines pass
them in ``added_cond_kwargs``. Its ControlNets take the same added conditions.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import IncompatibleModelsError, InputError, InputTypeError

TEXT_TIME = "text_time"
TIME_ID_COUNT = 6  # original (h, w), crop (top, left), target (h, w)

Pair = tuple[int, int]


def takes_text_time(config: Mapping[str, Any]) -> bool:
    """True when a UNet or ControlNet config takes SDXL's added conditions."""
    return config.get("addition_embed_type") == TEXT_TIME


def check_sdxl_models(unet, text_encoder, text_encoder_2) -> None:
    """Raise IncompatibleModelsError unless the encoders' sizes fit an SDXL UNet (cross-attention
    width, and the added embedding's input: six time ids plus the pooled text embedding)."""
    hidden = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    if hidden != unet.config.cross_attention_dim:
        raise IncompatibleModelsError(
            f"the text encoders' hidden sizes {text_encoder.config.hidden_size} + {text_encoder_2.config.hidden_size} = {hidden} "
            f"do not match the UNet's cross_attention_dim {unet.config.cross_attention_dim}"
        )
    time_dim = unet.config.addition_time_embed_dim
    given = TIME_ID_COUNT * time_dim + text_encoder_2.config.projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if given != expected:
        raise IncompatibleModelsError(
            f"the UNet's added embedding takes {expected} inputs, but {TIME_ID_COUNT} time ids x addition_time_embed_dim "
            f"{time_dim} + text_encoder_2's projection_dim {text_encoder_2.config.projection_dim} make {given}"
        )


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning (diffusers' argument names; sizes are (height, width)).

    ``original_size`` and ``target_size`` default to the output size, ``crops_coords_top_left``
    to (0, 0). The negative forms condition the unconditional half of classifier-free guidance;
    as in diffusers they are used only when both ``negative_original_size`` and
    ``negative_target_size`` are given, and otherwise equal the positive ones.
    """

    original_size: Pair | None = None
    crops_coords_top_left: Pair = (0, 0)
    target_size: Pair | None = None
    negative_original_size: Pair | None = None
    negative_crops_coords_top_left: Pair = (0, 0)
    negative_target_size: Pair | None = None

    @classmethod
    def coerce(cls, value: Any) -> MicroConditioning:
        """``None``, a MicroConditioning, or a dict of its fields, checked; a typed error names what does not fit."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            items = {f.name: getattr(value, f.name) for f in fields(cls)}
        elif isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                known = ", ".join(f.name for f in fields(cls))
                raise InputError(f"micro_conditioning: unknown key(s) {', '.join(map(repr, unknown))}; expected some of {known}")
            items = dict(value)
        else:
            raise InputTypeError(f"micro_conditioning: expected None, a MicroConditioning or a dict, got {type(value).__name__}")
        return cls(**{name: _pair(name, pair, optional="crops" not in name) for name, pair in items.items()})

    def time_ids(self, height: int, width: int) -> tuple[list[int], list[int]]:
        """(positive, negative) time ids for an output of ``height`` x ``width`` pixels."""
        output = (height, width)
        positive = [*(self.original_size or output), *self.crops_coords_top_left, *(self.target_size or output)]
        if self.negative_original_size is not None and self.negative_target_size is not None:
            negative = [*self.negative_original_size, *self.negative_crops_coords_top_left, *self.negative_target_size]
        else:
            negative = positive
        return positive, negative


def _pair(name: str, value: Any, *, optional: bool) -> Pair | None:
    if value is None and optional:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in value)
    if not ok:
        raise InputError(f"micro_conditioning.{name}: expected (height, width) as two ints >= 0, got {value!r}")
    return int(value[0]), int(value[1])
