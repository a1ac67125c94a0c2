"""ccm-condition-pose: ViTPose loading, crop and heatmap decoding, OpenPose drawing, the Condition contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ccm_condition_pose as pose
from ccm_sdk import get_condition
from ccm_sdk.errors import CorruptWeightsError, IncompatibleModelsError, MissingModelError
from ccm_sdk.testing.conditions import ConditionTestBase, sample_photos


class TestPoseCondition(ConditionTestBase):
    condition_name = "pose"
    condition_options = {"threshold": 0.0}  # a random network scores low: draw every keypoint
    atol = 1e-4

    def create_condition(self, workdir, **options):
        folder = workdir / "tiny-vitpose"
        if not folder.exists():
            pose.build_tiny_pose_model(folder)
        return get_condition("pose", model=str(folder), **{**self.condition_options, **options})


@pytest.fixture(scope="module")
def pose_dir(tmp_path_factory):
    return pose.build_tiny_pose_model(tmp_path_factory.mktemp("pose") / "vitpose")


def test_control_map_draws_a_skeleton(pose_dir):
    out = get_condition("pose", model=str(pose_dir), threshold=0.0)(sample_photos((96, 64), 1))
    drawn = out.sum(dim=1) > 0
    assert 0.01 < drawn.float().mean() < 0.9


def test_crop_and_decoding_match_the_transformers_image_processor(pose_dir):
    from transformers import AutoImageProcessor

    photo = sample_photos((120, 90), 1)
    height, width = photo.shape[-2:]
    condition = get_condition("pose", model=str(pose_dir))
    processor = AutoImageProcessor.from_pretrained(pose_dir)
    as_uint8 = (photo[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    boxes = [[[0, 0, width, height]]]
    expected_inputs = processor(as_uint8, boxes=boxes, return_tensors="pt")["pixel_values"]
    center, scale = pose.whole_image_box(height, width, condition.preprocessing["size"])
    crop = pose.crop(photo, center, scale, condition.preprocessing["size"])
    mean = torch.tensor(condition.preprocessing["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(condition.preprocessing["image_std"]).view(1, 3, 1, 1)
    # scipy's warp blanks the pixels straddling the image border, which grid_sample blends:
    # those one-pixel lines differ, everything else agrees
    diff = ((crop - mean) / std - expected_inputs).abs().amax(dim=1)
    assert (diff > 0.05).float().mean() < 0.05
    with torch.no_grad():
        outputs = condition.model(pixel_values=expected_inputs)
    expected = processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]
    keypoints, scores = pose.decode_heatmaps(outputs.heatmaps, center, scale)
    torch.testing.assert_close(keypoints[0], expected["keypoints"].float(), atol=1e-2, rtol=0)  # pixels
    torch.testing.assert_close(scores[0], expected["scores"].float())


def test_decoding_recovers_a_sub_pixel_peak():
    height, width, size = 200, 150, (64, 48)
    center, scale = pose.whole_image_box(height, width, size)
    target = (61.3, 142.7)  # image pixels
    hx = (target[0] - center[0] + scale[0] / 2) * (size[1] / 4 - 1) / scale[0]
    hy = (target[1] - center[1] + scale[1] / 2) * (size[0] / 4 - 1) / scale[1]
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(12.0), indexing="ij")
    heatmap = torch.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * 1.5**2))
    keypoints, scores = pose.decode_heatmaps(heatmap.expand(1, 17, -1, -1), center, scale)
    assert abs(keypoints[0, 0, 0] - target[0]) < 1.0 and abs(keypoints[0, 0, 1] - target[1]) < 1.0
    assert scores[0, 0] > 0.9


def test_coco_keypoints_become_openpose_order_with_a_neck():
    coco = torch.tensor([[[float(i), float(10 * i)] for i in range(17)]])
    people = pose.to_openpose(coco, torch.ones(1, 17), threshold=0.3)
    points = people[0]
    assert len(points) == 18
    assert points[0] == (0.0, 0.0)  # nose
    assert points[1] == (5.5, 55.0)  # neck: between the shoulders (COCO 5 and 6)
    assert points[2] == (6.0, 60.0) and points[5] == (5.0, 50.0)  # right, left shoulder
    assert points[14] == (2.0, 20.0) and points[17] == (3.0, 30.0)  # right eye, left ear


def test_low_scoring_keypoints_and_the_neck_without_both_shoulders_are_dropped():
    scores = torch.ones(1, 17)
    scores[0, 6] = 0.1  # right shoulder
    points = pose.to_openpose(torch.zeros(1, 17, 2), scores, threshold=0.3)[0]
    assert points[2] is None and points[1] is None and points[5] is not None


def test_openpose_drawing_colours():
    skeleton = [None] * 18
    skeleton[1], skeleton[2] = (50.0, 40.0), (30.0, 40.0)  # neck, right shoulder: limb 0
    canvas = pose.draw_openpose(skeleton, 80, 100, stick_width=4)
    assert tuple(canvas[40, 50]) == pose.COLORS[1]  # the neck joint, full colour
    assert tuple(canvas[40, 30]) == pose.COLORS[2]
    assert tuple(canvas[40, 40]) == tuple(int(c * 0.6) for c in pose.COLORS[0])  # limb at 60%
    assert canvas[:30].max() == 0 and canvas[50:].max() == 0  # black elsewhere


def test_stick_width_scales_with_image_size(pose_dir):
    image = sample_photos((256, 256), 1)
    narrow = get_condition("pose", model=str(pose_dir), threshold=0.0, stick_width=1)(image)
    wide = get_condition("pose", model=str(pose_dir), threshold=0.0, stick_width=8)(image)
    assert (wide.sum(1) > 0).sum() > 2 * (narrow.sum(1) > 0).sum()


def test_high_threshold_draws_nothing(pose_dir):
    assert get_condition("pose", model=str(pose_dir), threshold=1e9)(sample_photos((64, 64), 1)).max() == 0


def test_mixture_of_experts_models_take_the_dataset_index(tmp_path):
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    torch.manual_seed(0)
    backbone = VitPoseBackboneConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=[64, 48],
        patch_size=[16, 16],
        out_indices=[2],
        num_experts=2,
        part_features=4,
    )
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17)).save_pretrained(tmp_path)
    image = sample_photos((64, 64), 1)
    first = get_condition("pose", model=str(tmp_path), threshold=0.0, dataset_index=0).keypoints(image)[0]
    second = get_condition("pose", model=str(tmp_path), threshold=0.0, dataset_index=1).keypoints(image)[0]
    assert not torch.allclose(first, second)


def test_missing_folder_raises_missing_model(tmp_path):
    with pytest.raises(MissingModelError, match="does not exist"):
        get_condition("pose", model=str(tmp_path / "nowhere"))


def test_garbage_safetensors_raises_corrupt_weights(pose_dir, tmp_path):
    (tmp_path / "config.json").write_text((pose_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(CorruptWeightsError):
        get_condition("pose", model=str(tmp_path))


def test_model_of_another_kind_raises_incompatible(tmp_path):
    from transformers import DPTConfig

    DPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(IncompatibleModelsError, match="'dpt'"):
        get_condition("pose", model=str(tmp_path))


def test_model_with_other_keypoints_raises_incompatible(tmp_path):
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    backbone = VitPoseBackboneConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, out_indices=[1])
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=133)).save_pretrained(tmp_path)
    with pytest.raises(IncompatibleModelsError, match="133 keypoints"):
        get_condition("pose", model=str(tmp_path))


def test_hub_repo_offline_without_cache_raises_missing_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingModelError, match="local cache"):
        get_condition("pose", model="someone/vitpose", local_files_only=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(pose_dir):
    image = sample_photos((64, 64), 2)
    condition = get_condition("pose", model=str(pose_dir), threshold=0.0)
    keypoints, _ = condition.keypoints(image)
    cuda_keypoints, _ = condition.to("cuda").keypoints(image)
    torch.testing.assert_close(cuda_keypoints.cpu(), keypoints, atol=0.05, rtol=0)
