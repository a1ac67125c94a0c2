"""ccm-condition-hed: the HED network, its weight loading, and the Condition contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ccm_condition_hed as hed
from ccm_sdk import get_condition
from ccm_sdk.errors import CorruptWeightsError, IncompatibleModelsError, MissingModelError
from ccm_sdk.testing.conditions import ConditionTestBase, sample_photos


class TestHEDCondition(ConditionTestBase):
    condition_name = "hed"
    atol = 1e-4  # convolutions may pick other kernels for other batch sizes

    def create_condition(self, workdir, **options):
        folder = workdir / "tiny-hed"
        if not folder.exists():
            hed.build_tiny_hed(folder)
        return get_condition("hed", model=str(folder), **options)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return hed.build_tiny_hed(tmp_path_factory.mktemp("hed") / "tiny")


def test_full_network_has_the_annotator_layout():
    network = hed.HEDNetwork()
    keys = set(network.state_dict())
    assert {"norm", "block1.convs.0.weight", "block1.convs.1.bias", "block1.projection.weight"} <= keys
    assert {"block5.convs.2.weight", "block5.projection.bias"} <= keys
    assert "block1.convs.2.weight" not in keys and "block3.convs.2.weight" in keys
    # VGG-16 conv layers (14,714,688) + five 1x1 side outputs (1,477) + norm (3)
    assert sum(p.numel() for p in network.parameters()) == 14_716_168


def test_side_outputs_halve_in_size(tiny_dir):
    network = hed.load_hed(tiny_dir)
    sides = network(torch.rand(1, 3, 64, 48) * 255)
    assert [tuple(s.shape[-2:]) for s in sides] == [(64, 48), (32, 24), (16, 12), (8, 6), (4, 3)]
    assert all(s.shape[1] == 1 for s in sides)


def test_edges_are_the_sigmoid_of_the_mean_upsampled_side_output(tiny_dir):
    image = sample_photos((48, 64), 1)
    condition = get_condition("hed", model=str(tiny_dir))
    sides = condition.network(image * 255)
    logits = torch.stack([F.interpolate(s, size=(48, 64), mode="bilinear", align_corners=False) for s in sides])
    torch.testing.assert_close(condition(image)[:, :1], torch.sigmoid(logits.mean(0)))


def test_safe_mode_quantises_to_three_levels(tiny_dir):
    out = get_condition("hed", model=str(tiny_dir), safe=True)(sample_photos((48, 64), 1))
    assert set(out.unique().tolist()) <= {0.0, 0.5, 1.0}


def test_torch_state_dict_file_loads_like_safetensors(tiny_dir, tmp_path):
    state = hed.load_hed(tiny_dir).state_dict()
    torch.save(state, tmp_path / "ControlNetHED.pth")
    image = sample_photos((32, 32), 1)
    expected = get_condition("hed", model=str(tiny_dir))(image)
    torch.testing.assert_close(get_condition("hed", model=str(tmp_path))(image), expected)
    torch.save({"state_dict": state}, tmp_path / "wrapped.ckpt")
    torch.testing.assert_close(get_condition("hed", model=str(tmp_path / "wrapped.ckpt"))(image), expected)


def test_full_width_weights_load_from_a_pth_file(tmp_path):
    network = hed.HEDNetwork()
    torch.save(network.state_dict(), tmp_path / "ControlNetHED.pth")
    loaded = hed.load_hed(tmp_path, filename="ControlNetHED.pth")
    assert loaded.widths == hed.FULL_WIDTHS
    torch.testing.assert_close(loaded.block5.projection.weight, network.block5.projection.weight)


def test_missing_folder_raises_missing_model(tmp_path):
    with pytest.raises(MissingModelError, match="does not exist"):
        get_condition("hed", model=str(tmp_path / "nowhere"))


def test_folder_without_weights_raises_missing_model(tmp_path):
    with pytest.raises(MissingModelError, match="ControlNetHED.pth"):
        get_condition("hed", model=str(tmp_path))


def test_garbage_safetensors_raises_corrupt_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(CorruptWeightsError):
        get_condition("hed", model=str(tmp_path))


def test_garbage_pth_raises_corrupt_weights(tmp_path):
    (tmp_path / "ControlNetHED.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(CorruptWeightsError):
        get_condition("hed", model=str(tmp_path))


def test_weights_of_another_architecture_raise_incompatible(tmp_path):
    torch.save(torch.nn.Linear(4, 4).state_dict(), tmp_path / "ControlNetHED.pth")
    with pytest.raises(IncompatibleModelsError, match="not HED weights"):
        get_condition("hed", model=str(tmp_path))


def test_hed_weights_with_an_extra_layer_raise_incompatible(tiny_dir, tmp_path):
    state = hed.load_hed(tiny_dir).state_dict()
    state["block1.convs.2.weight"] = torch.zeros(4, 4, 3, 3)
    torch.save(state, tmp_path / "ControlNetHED.pth")
    with pytest.raises(IncompatibleModelsError, match="unexpected"):
        get_condition("hed", model=str(tmp_path))


def test_hub_repo_offline_without_cache_raises_missing_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingModelError, match="offline"):
        get_condition("hed", model="someone/hed-weights")


def test_local_files_only_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingModelError, match="local cache only"):
        get_condition("hed", local_files_only=True)


def test_to_moves_the_network(tiny_dir):
    condition = get_condition("hed", model=str(tiny_dir))
    assert condition.to("cpu") is condition
    assert condition.network.norm.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_dir):
    image = sample_photos((64, 64), 2)
    condition = get_condition("hed", model=str(tiny_dir))
    expected = condition(image)
    torch.testing.assert_close(condition.to("cuda")(image).cpu(), expected, atol=1e-3, rtol=0)
