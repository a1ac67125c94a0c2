"""Every control map against what the scene says it must be."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccm_condition_pose import COLORS as OPENPOSE_COLORS
from ccm_sdk.conditions.mask import random_masks
from ccm_world import PALETTE, Background, Person, Scene, Shape, WorldDataset
from ccm_world import render
from ccm_world.generate import SceneConfig


@pytest.fixture(scope="module")
def data():
    return WorldDataset(length=200, seed=11)


@pytest.fixture(scope="module")
def samples(data):
    return [data.render(i) for i in range(60)]


def _square_scene(size=64):
    # an axis-aligned square with half-side 0.88 * 11.3636 = 10 px: columns and rows 22..41
    square = Shape("square", "red", "large", (32.0, 32.0), 10 / 0.88, 0.0)
    return Scene(size, size, Background("blue"), (square,), caption="a large red square on a blue background")


def test_square_edges_lie_exactly_on_its_border():
    scene = _square_scene()
    labels_ss, labels = render.render_labels(scene, 4)
    inside = np.zeros((64, 64), bool)
    inside[22:42, 22:42] = True
    np.testing.assert_array_equal(labels == 1, inside)
    edges = render.edge_map(labels).astype(bool)
    expected = np.zeros((64, 64), bool)
    expected[22:42, [21, 41]] = True  # background pixel left of the square, square pixel at its right end
    expected[[21, 41], 22:42] = True
    np.testing.assert_array_equal(edges, expected)
    image = render.render_image(scene, labels_ss, 4)
    np.testing.assert_allclose(image[30, 30] * 255, PALETTE["red"], atol=0.5)
    np.testing.assert_allclose(image[5, 5] * 255, PALETTE["blue"], atol=0.5)


def test_edges_mark_exactly_the_label_boundaries(samples):
    for sample in samples:
        labels, edges = sample.labels, sample.controls["canny"].astype(bool)
        differs = np.zeros_like(edges)
        differs[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        differs[:-1, :] |= labels[:-1, :] != labels[1:, :]
        np.testing.assert_array_equal(edges, differs)
        assert edges.any()
        # every edge pixel touches a colour change in the image (within a pixel: anti-aliasing)
        jumps = np.zeros_like(edges)
        image = sample.image
        jumps[:, :-1] |= np.abs(image[:, :-1] - image[:, 1:]).max(-1) > 0.03
        jumps[:-1, :] |= np.abs(image[:-1, :] - image[1:, :]).max(-1) > 0.03
        assert (edges <= cv2.dilate(jumps.astype(np.uint8), np.ones((3, 3))).astype(bool)).all()


def _pure_blocks(sample, factor=4):
    """Per output pixel, the label when its whole supersampled block has that one label, else -1."""
    labels_ss, _ = render.render_labels(sample.scene, factor)
    blocks = labels_ss.reshape(64, factor, 64, factor).transpose(0, 2, 1, 3).reshape(64, 64, -1).astype(int)
    return np.where((blocks == blocks[..., :1]).all(-1), blocks[..., 0], -1), labels_ss


def test_depth_follows_the_layers(samples):
    for sample in samples:
        depth, count = sample.controls["depth"], len(sample.scene.objects)
        pure, _ = _pure_blocks(sample)
        assert (depth[pure == 0] == 0).all()  # the background is the farthest
        for k in range(1, count + 1):
            if (pure == k).any():  # object k - 1 of count: later layers nearer, brighter
                np.testing.assert_allclose(depth[pure == k], round(255 * k / count) / 255, atol=1e-6)
        assert depth.max() <= 1.0


def test_sketch_strokes_follow_the_outlines(samples):
    for sample in samples:
        sketch, edges = sample.controls["sketch"], sample.controls["canny"]
        _, labels_ss = _pure_blocks(sample)
        boundary = render.edge_map(labels_ss).reshape(64, 4, 64, 4).max(axis=(1, 3))  # an outline crosses the pixel
        assert (sketch[cv2.dilate(boundary, np.ones((3, 3))) == 0] == 0).all()
        assert (cv2.dilate(sketch, np.ones((3, 3)))[edges > 0] > 0).all()  # and every edge has a stroke beside it


def test_soft_edges_are_the_blurred_edges(samples):
    for sample in samples:
        soft, edges = sample.controls["hed"], sample.controls["canny"]
        assert soft.max() <= 1.0 and soft[edges > 0].mean() > 0.4
        far = cv2.dilate(edges, np.ones((9, 9))) == 0
        assert (soft[far] == 0).all()
    straight = np.zeros((20, 20), np.float32)
    straight[:, 10] = 1
    assert render.soft_edge_map(straight, 1.0)[10, 10] == 1.0  # a straight line peaks at exactly 1


def test_keypoints_are_inside_the_image_and_drawn_in_openpose_colours():
    data = WorldDataset(length=40, seed=2, scene_config=SceneConfig(person_probability=1.0), conditions=("pose",))
    for i in range(40):
        sample = data.render(i)
        people = [o for o in sample.scene.objects if isinstance(o, Person)]
        assert len(people) == 1
        points = np.asarray(people[0].keypoints)
        assert points.shape == (18, 2)
        assert (points >= 0).all() and (points[:, 0] < 64).all() and (points[:, 1] < 64).all()
        pose = sample.controls["pose"]
        x, y = (int(v) for v in points[17])  # the left ear is drawn last: its colour is exact
        np.testing.assert_allclose(pose[y, x] * 255, OPENPOSE_COLORS[17])
        assert len(sample.keypoint_visible) == 1 and len(sample.keypoint_visible[0]) == 18
        # the figure's anatomy: neck above the hips, the person's right (image left) shoulder left of the left one
        assert points[1, 1] < points[8, 1] and points[2, 0] < points[5, 0]


def test_pose_map_is_black_without_people():
    data = WorldDataset(length=10, seed=2, scene_config=SceneConfig(person_probability=0.0), conditions=("pose",))
    assert all(data.render(i).controls["pose"].max() == 0 for i in range(10))


def test_sr_map_is_the_downsampled_then_upsampled_image(data):
    for factor in (4, 8):
        item = WorldDataset(length=5, seed=11, sr_factor=factor, conditions=("sr",))[3]
        image = item["image"][None]
        low = F.interpolate(image, size=(64 // factor, 64 // factor), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        expected = F.interpolate(low, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)[0]
        torch.testing.assert_close(item["controls"]["sr"], (expected * 255).round() / 255, atol=1 / 255 + 1e-6, rtol=0)


def test_mask_map_is_the_masked_image_and_a_seeded_random_mask(data):
    item = data[5]
    mask = random_masks(1, 64, 64, seed=np.random.default_rng([11, 5, 1]))[0]
    control = item["controls"]["mask"]
    torch.testing.assert_close(control[3:], mask)
    torch.testing.assert_close(control[:3], item["image"] * (1 - mask))
    assert 0.05 < mask.mean() < 0.7
