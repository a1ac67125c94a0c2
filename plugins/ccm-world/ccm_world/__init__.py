"""ccm-world: a procedural world of shapes and stick figures with captions and exact control maps.

The world is the SDK's embedded default domain: images small enough to train on a CPU, a closed
caption vocabulary for a tiny text encoder, and, because every scene is rendered, the exact
ground truth of every condition (edges, sketch, soft edges, depth, pose, masks, low resolution).

    from ccm_world import WorldDataset, world_tokenizer
    data = WorldDataset(size=64, length=10_000, seed=0)
    item = data[0]   # {"image", "caption", "controls", "labels", "index", "scene"}

As a ccm-sdk plugin it registers, through the public hooks: the dataset ``world``
(``ccm_sdk.registry.get_dataset("world", ...)``), the conditions ``world-edges`` and
``world-soft-edges`` (the edge ground truths read back from pixels, for Fidelity),
``world-depth`` and ``world-pose`` (layer depth and skeletons from the world's trained map
nets), and the model
source ``world`` (``CCMPipeline.from_pretrained("world:<name>")`` for the world's trained models).
"""

from __future__ import annotations

from pathlib import Path

import ccm_sdk
from ccm_sdk.errors import MissingModelError

from .conditions import (
    WORLD_CONDITION_CLASSES,
    WorldDepthCondition,
    WorldEdgesCondition,
    WorldPoseCondition,
    WorldSoftEdgesCondition,
    colour_edges,
)
from .dataset import ATTRIBUTE_NAMES, CONTROL_CHANNELS, WORLD_CONDITIONS, WorldDataset, WorldSample, scene_attributes
from .generate import SceneConfig, describe, sample_scene
from .scene import KEYPOINT_NAMES, Background, Person, Scene, Shape
from .vocabulary import (
    COLORS,
    MAX_CAPTION_TOKENS,
    PALETTE,
    SHAPES,
    SIZES,
    WORLD_VOCABULARY,
    min_contrast,
    word_token_ids,
    world_tokenizer,
)

__all__ = [
    "ATTRIBUTE_NAMES",
    "Background",
    "COLORS",
    "CONTROL_CHANNELS",
    "KEYPOINT_NAMES",
    "MAX_CAPTION_TOKENS",
    "PALETTE",
    "Person",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneConfig",
    "Shape",
    "WORLD_CONDITIONS",
    "WORLD_VOCABULARY",
    "WorldDataset",
    "WorldDepthCondition",
    "WorldEdgesCondition",
    "WorldPoseCondition",
    "WorldSample",
    "WorldSoftEdgesCondition",
    "colour_edges",
    "describe",
    "min_contrast",
    "sample_scene",
    "scene_attributes",
    "word_token_ids",
    "world_tokenizer",
]


MODELS_DIR = Path(__file__).parent / "models"


def world_model(name: str) -> Path:
    """The folder of the world's pretrained model ``name`` (``world:<name>`` in the SDK)."""
    available = sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir()) if MODELS_DIR.is_dir() else []
    if name not in available:
        raise MissingModelError(
            f"the world has no pretrained model {name!r} (available: {', '.join(available) or 'none built yet'}); "
            "the world's models are trained with the SDK's trainers, see docs/world.md"
        )
    return MODELS_DIR / name


@ccm_sdk.hookimpl
def register_datasets(register):
    register(WorldDataset, name="world")


@ccm_sdk.hookimpl
def register_models(register):
    register(world_model, name="world")


@ccm_sdk.hookimpl
def register_conditions(register):
    for condition_cls in WORLD_CONDITION_CLASSES:
        register(condition_cls)
