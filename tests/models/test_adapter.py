"""The unified adapter: identity at init, JSON config round trip, compatibility and load errors."""

from __future__ import annotations

import json

import pytest
import torch

from ccm_sdk.errors import CorruptWeightsError, IncompatibleModelsError, InputError, MissingModelError, ShapeError
from ccm_sdk.models.adapter import UnifiedAdapter, UnifiedAdapterConfig, controlnet_output_channels, load_adapter
from ccm_sdk.testing import tiny


@pytest.fixture(scope="module")
def controlnet():
    return tiny.tiny_controlnet(tiny.tiny_unet())


def _residuals(controlnet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, tiny.TEXT_DIM, generator=g)
    with torch.no_grad():
        return controlnet(x, 500, encoder_hidden_states=emb, controlnet_cond=torch.rand(2, 3, 64, 64, generator=g), return_dict=False)


def test_channels_follow_the_controlnet(controlnet):
    assert controlnet_output_channels(controlnet) == (32, 32, 32, 64, 64)


def test_fresh_adapter_is_identity(controlnet):
    down, mid = _residuals(controlnet)
    adapter = UnifiedAdapter.for_controlnet(controlnet)
    new_down, new_mid = adapter(down, mid)
    assert all(torch.equal(a, b) for a, b in zip(down, new_down)) and torch.equal(mid, new_mid)


def test_forward_matches_plain_torch(controlnet):
    down, mid = _residuals(controlnet)
    adapter = UnifiedAdapter.for_controlnet(controlnet, activation="gelu", hidden_ratio=0.5)
    with torch.no_grad():
        for block in adapter.blocks:
            block.conv2.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    new_down, _ = adapter(down, mid)
    block, r = adapter.blocks[0], down[0]
    expected = r + block.conv2(torch.nn.functional.gelu(block.conv1(r)))
    assert torch.allclose(new_down[0], expected, atol=1e-5)


def test_config_round_trips_through_json(tmp_path, controlnet):
    adapter = UnifiedAdapter.for_controlnet(controlnet, kernel_size=1)
    with torch.no_grad():
        adapter.blocks[2].conv2.bias.fill_(0.5)
    adapter.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert UnifiedAdapterConfig(**{k: v for k, v in config.items() if k != "_class_name"}) == adapter.config
    loaded = load_adapter(tmp_path / "a")
    assert isinstance(loaded, UnifiedAdapter)
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), loaded.state_dict().values()))
    assert not list((tmp_path / "a").glob(".*.tmp"))  # written atomically, no leftovers


def test_unknown_config_keys_are_rejected():
    with pytest.raises(InputError, match="invalid adapter config"):
        UnifiedAdapter(channels=(4,), depth=3)


def test_incompatible_controlnet(controlnet):
    adapter = UnifiedAdapter(channels=(8, 8))
    with pytest.raises(IncompatibleModelsError, match=r"expects ControlNet outputs with channels \[8, 8\], got \[32"):
        adapter.check_compatible(controlnet)
    with pytest.raises(ShapeError, match="expects 1 down residuals"):
        adapter([torch.zeros(1, 8, 2, 2)] * 2, torch.zeros(1, 8, 2, 2))


def test_weights_that_do_not_match_config(tmp_path, controlnet):
    UnifiedAdapter.for_controlnet(controlnet).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["hidden_ratio"] = 2.0
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptWeightsError, match="do not match config.json"):
        load_adapter(tmp_path / "a")


def test_missing_or_corrupt_adapter_files(tmp_path, controlnet):
    with pytest.raises(MissingModelError):
        load_adapter(tmp_path / "none")
    UnifiedAdapter.for_controlnet(controlnet).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"broken")
    with pytest.raises(CorruptWeightsError, match="not a valid safetensors file"):
        load_adapter(tmp_path / "a")
