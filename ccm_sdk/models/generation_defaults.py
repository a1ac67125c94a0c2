"""The settings a model folder recommends for generation: ``ccm_defaults.json`` beside
``model_index.json``.

A latent consistency model takes the guidance scale as an input (its w-embedding) and is only
trained on the range it was distilled with: an LCM distilled with w ~ U[1, 4] has never seen the
guidance scale 8 (w = 7) that suits one distilled with w ~ U[3, 15]. The distillation therefore
writes the scale it was made for, and :class:`~ccm_sdk.pipeline.CCMPipeline` uses it whenever a
call leaves ``guidance_scale`` unset (as do ``ccm generate``, the drawing page and streams). A folder
without the file gets the SDK's general default. Diffusers ignores the file, so such a folder still
loads there.

    {"guidance_scale": 3.5}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import CorruptWeightsError
from ..utils.atomic import write_text_atomic
from ..utils.validation_errors import validation_problems

FILE = "ccm_defaults.json"
GUIDANCE_SCALE = 8.0  # a folder without the file: the LCM papers' usual scale


class GenerationDefaults(BaseModel):
    """What a model folder recommends; every key optional, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    guidance_scale: float = Field(GUIDANCE_SCALE, ge=0.0, le=100.0, allow_inf_nan=False,
                                  description="used when a call leaves guidance_scale unset")


def read_generation_defaults(folder: str | os.PathLike) -> GenerationDefaults:
    """The folder's ``ccm_defaults.json``, else the SDK's defaults; a malformed file raises
    :class:`~ccm_sdk.errors.CorruptWeightsError` naming it."""
    path = Path(folder) / FILE
    if not path.is_file():
        return GenerationDefaults()
    try:
        return GenerationDefaults.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptWeightsError(f"{str(path)!r} is not valid JSON ({exc})") from None
    except ValidationError as exc:
        problems = validation_problems(exc, root="document")
        raise CorruptWeightsError(f"{str(path)!r}: expected {{\"guidance_scale\": <0..100>}}, got {problems}") from None


def write_generation_defaults(folder: str | os.PathLike, defaults: GenerationDefaults) -> Path | None:
    """Write ``ccm_defaults.json`` (only the keys that differ from the SDK's defaults; nothing when none do)."""
    data = defaults.model_dump(exclude_defaults=True)
    path = Path(folder) / FILE
    if not data:
        path.unlink(missing_ok=True)
        return None
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
