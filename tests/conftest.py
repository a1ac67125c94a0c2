"""Shared fixtures: tiny models saved once per session in hub layout, and tiny square-image datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk.testing import tiny

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def write_squares(folder: Path, *, count: int = 8, size: int = 32, seed: int = 0, control_key: str | None = None) -> Path:
    """Coloured squares on a dark background, captioned "a <colour> square"; optionally a
    precomputed control map (the square's outline) per image under ``folder/<control_key>/``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    for i in range(count):
        name = names[i % len(names)]
        image = np.full((size, size, 3), 30, np.uint8)
        side = size // 2
        x, y = (int(v) for v in rng.integers(1, size - side - 1, 2))
        image[y : y + side, x : x + side] = COLORS[name]
        Image.fromarray(image).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {name} square")
        if control_key:
            edges = np.zeros((size, size), np.uint8)
            edges[y : y + side, x : x + side] = 255
            edges[y + 1 : y + side - 1, x + 1 : x + side - 1] = 0
            (folder / control_key).mkdir(exist_ok=True)
            Image.fromarray(np.stack([edges] * 3, -1)).save(folder / control_key / f"img{i}.png")
    return folder


@pytest.fixture(scope="session")
def lcm_dir(tmp_path_factory):
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-lcm", lcm=True)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    """A plain diffusion model (no guidance embedding): the DM baseline and LCM-LoRA base."""
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", lcm=False)


@pytest.fixture(scope="session")
def controlnet_dir(tmp_path_factory, lcm_dir):
    return tiny.save_tiny_controlnet(tmp_path_factory.mktemp("models") / "cn-a", lcm_dir, seed=1)


@pytest.fixture(scope="session")
def controlnet_b_dir(tmp_path_factory, lcm_dir):
    return tiny.save_tiny_controlnet(tmp_path_factory.mktemp("models") / "cn-b", lcm_dir, seed=2)


@pytest.fixture(scope="session")
def sd_controlnet_dir(tmp_path_factory, sd_dir):
    return tiny.save_tiny_controlnet(tmp_path_factory.mktemp("models") / "cn-sd", sd_dir, seed=3)


@pytest.fixture()
def control_image():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def squares(tmp_path_factory) -> Path:
    return write_squares(tmp_path_factory.mktemp("data") / "squares", control_key="control")


@pytest.fixture()
def make_squares():
    """:func:`write_squares` for tests that need their own image folder."""
    return write_squares


@pytest.fixture(scope="session")
def sdxl_lcm_dir(tmp_path_factory):
    """A tiny SDXL-architecture LCM (two text encoders, text_time UNet with the guidance embedding)."""
    return tiny.save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-lcm-sdxl", lcm=True)


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """A tiny plain SDXL-architecture model: the DM baseline and LCM-LoRA base."""
    return tiny.save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", lcm=False)


@pytest.fixture(scope="session")
def sdxl_controlnet_dir(tmp_path_factory, sdxl_lcm_dir):
    return tiny.save_tiny_controlnet(tmp_path_factory.mktemp("models") / "cn-sdxl-a", sdxl_lcm_dir, seed=4)


@pytest.fixture(scope="session")
def sdxl_controlnet_b_dir(tmp_path_factory, sdxl_lcm_dir):
    return tiny.save_tiny_controlnet(tmp_path_factory.mktemp("models") / "cn-sdxl-b", sdxl_lcm_dir, seed=5)


@pytest.fixture(scope="session")
def sdxl_plain_controlnet_dir(tmp_path_factory, sdxl_dir):
    return tiny.save_tiny_controlnet(tmp_path_factory.mktemp("models") / "cn-sdxl-plain", sdxl_dir, seed=6)
