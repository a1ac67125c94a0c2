"""Shared fixtures: tiny models saved once per session in hub layout."""

from __future__ import annotations

import pytest
import torch

from ccm_sdk.testing import tiny


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
