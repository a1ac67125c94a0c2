"""ccm-condition-depth: loading transformers depth estimators offline, preprocessing, the Condition contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ccm_condition_depth as depth
from ccm_sdk import get_condition
from ccm_sdk.errors import CorruptWeightsError, IncompatibleModelsError, MissingModelError
from ccm_sdk.testing.conditions import ConditionTestBase, sample_photos


class TestDepthAnything(ConditionTestBase):
    condition_name = "depth"
    atol = 1e-4

    def create_condition(self, workdir, **options):
        folder = workdir / "tiny-depth-anything"
        if not folder.exists():
            depth.build_tiny_depth_model(folder, kind="depth_anything")
        return get_condition("depth", model=str(folder), **options)


class TestDPT(TestDepthAnything):
    def create_condition(self, workdir, **options):
        folder = workdir / "tiny-dpt"
        if not folder.exists():
            depth.build_tiny_depth_model(folder, kind="dpt")
        return get_condition("depth", model=str(folder), **options)


@pytest.fixture(scope="module")
def anything_dir(tmp_path_factory):
    return depth.build_tiny_depth_model(tmp_path_factory.mktemp("depth") / "da", kind="depth_anything")


@pytest.fixture(scope="module")
def dpt_dir(tmp_path_factory):
    return depth.build_tiny_depth_model(tmp_path_factory.mktemp("depth") / "dpt", kind="dpt")


@pytest.mark.parametrize("folder", ["anything_dir", "dpt_dir"])
def test_model_inputs_match_the_transformers_image_processor(folder, request):
    from transformers import AutoImageProcessor

    folder = request.getfixturevalue(folder)
    photo = sample_photos((120, 90), 1)
    condition = get_condition("depth", model=str(folder))
    processor = AutoImageProcessor.from_pretrained(folder)
    as_uint8 = (photo[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    expected = processor(as_uint8, return_tensors="pt")["pixel_values"]
    ours = condition.model_inputs(photo)
    assert ours.shape == expected.shape  # same size rules: aspect ratio, multiple of the patch size
    assert (ours - expected).abs().mean() < 0.02  # torch vs PIL bicubic resampling differ slightly


def test_input_size_rules():
    assert depth.model_input_size(480, 640, (518, 518), True, 14) == (518, 686)
    assert depth.model_input_size(480, 640, (384, 384), False, 1) == (384, 384)
    assert depth.model_input_size(2, 2, (56, 56), True, 14) == (56, 56)


def test_output_is_min_max_normalised_per_image(anything_dir):
    out = get_condition("depth", model=str(anything_dir))(sample_photos((64, 64), 2))
    for image in out:
        assert image.min() == 0 and image.max() == 1
        torch.testing.assert_close(image[0], image[1])


def test_near_is_bright_and_invert_flips(anything_dir):
    photo = sample_photos((48, 64), 1)
    condition = get_condition("depth", model=str(anything_dir))
    with torch.no_grad():
        raw = condition.model(pixel_values=condition.model_inputs(photo)).predicted_depth
    out = condition(photo)
    # Depth Anything predicts relative inverse depth: its largest value (nearest) maps to white.
    peak = torch.nn.functional.interpolate(raw[:, None], size=(48, 64), mode="bicubic", align_corners=False)
    assert out[0, 0].flatten()[peak.flatten().argmax()] == 1
    flipped = get_condition("depth", model=str(anything_dir), invert=True)(photo)
    torch.testing.assert_close(flipped, 1 - out)


def test_stereo_ground_truth_disparity_maps_near_to_white():
    # scikit-image's motorcycle pair comes with its ground-truth disparity: large = near
    data = pytest.importorskip("skimage.data")
    _, _, disparity = data.stereo_motorcycle()
    valid = np.isfinite(disparity) & (disparity > 0)
    disparity = np.where(valid, disparity, disparity[valid].min()).astype(np.float32)
    size = disparity.shape
    target = torch.from_numpy(disparity)
    out = depth.depth_to_control(torch.from_numpy(disparity)[None], size)[0, 0]
    near, far = np.unravel_index(int(target.argmax()), size), np.unravel_index(int(target.argmin()), size)
    assert out[near] == 1 and out[far] == 0
    # metric depth (1 / disparity) with invert=True gives the same near-to-far order
    metric = depth.depth_to_control(torch.from_numpy(1.0 / disparity)[None], size, invert=True)[0, 0]
    assert metric[near] == 1 and metric[far] == 0
    order = torch.argsort(target.flatten())
    assert out.flatten()[order[-100:]].mean() > out.flatten()[order[:100]].mean() + 0.5


def test_constant_prediction_is_black():
    assert depth.depth_to_control(torch.full((2, 8, 8), 3.0), (16, 16)).max() == 0


def test_missing_folder_raises_missing_model(tmp_path):
    with pytest.raises(MissingModelError, match="does not exist"):
        get_condition("depth", model=str(tmp_path / "nowhere"))


def test_folder_without_config_raises_missing_model(tmp_path):
    with pytest.raises(MissingModelError, match="config.json"):
        get_condition("depth", model=str(tmp_path))


def test_folder_without_weights_raises_missing_model(anything_dir, tmp_path):
    (tmp_path / "config.json").write_text((anything_dir / "config.json").read_text())
    with pytest.raises(MissingModelError):
        get_condition("depth", model=str(tmp_path))


def test_garbage_safetensors_raises_corrupt_weights(anything_dir, tmp_path):
    (tmp_path / "config.json").write_text((anything_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(CorruptWeightsError):
        get_condition("depth", model=str(tmp_path))


def test_model_of_another_kind_raises_incompatible(tmp_path):
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    VitPoseConfig(
        backbone_config=VitPoseBackboneConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path)
    with pytest.raises(IncompatibleModelsError, match="accepted kind"):
        get_condition("depth", model=str(tmp_path))


def test_weights_of_another_architecture_raise_incompatible(anything_dir, dpt_dir, tmp_path):
    (tmp_path / "config.json").write_text((anything_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((dpt_dir / "model.safetensors").read_bytes())
    with pytest.raises(IncompatibleModelsError, match="do not fit"):
        get_condition("depth", model=str(tmp_path))


def test_missing_preprocessor_config_falls_back_to_model_type_defaults(anything_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((anything_dir / name).read_bytes())
    condition = get_condition("depth", model=str(tmp_path))
    assert condition.preprocessing["size"] == {"height": 518, "width": 518}
    assert condition.preprocessing["ensure_multiple_of"] == 14
    assert json.loads((anything_dir / "preprocessor_config.json").read_text())["size"]["height"] == 56


def test_hub_repo_offline_without_cache_raises_missing_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingModelError):
        get_condition("depth", model="someone/depth-model", local_files_only=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(anything_dir):
    image = sample_photos((64, 64), 2)
    condition = get_condition("depth", model=str(anything_dir))
    expected = condition(image)
    torch.testing.assert_close(condition.to("cuda")(image).cpu(), expected, atol=1e-3, rtol=0)
