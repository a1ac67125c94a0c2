"""Validation samples while training: a grid per trainer at the configured steps, rows of the
right images, the prompts override, and weights identical to a run without validation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ccm_sdk.training import get_trainer
from ccm_sdk.training.validation import MIN_CELL, grid_image, sample_name

# rows each trainer draws: control + generated per ControlNet (adapter), control/generated/data, generated/data
ROWS = {"dm_controlnet": 3, "ct_controlnet": 3, "adapter": 5, "lcd": 2, "dreambooth": 2}


def _train(trainer: str, make_config, **overrides):
    config = make_config(trainer, **overrides)
    return get_trainer(trainer)(config).train()


def _grid_rows(path, cell: int = MIN_CELL, pad: int = 2) -> int:
    return (Image.open(path).height - 14 - pad) // (cell + pad)


@pytest.mark.parametrize("trainer", sorted(ROWS))
def test_each_trainer_renders_a_grid_at_every_and_at_the_end(trainer, make_config):
    result = _train(trainer, make_config, train__max_steps=3, validation__interval=2, validation__num_images=2, validation__sample_steps=2)
    samples = result.output_dir / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == [sample_name(2), sample_name(3)]
    grid = Image.open(samples / sample_name(3))
    assert _grid_rows(samples / sample_name(3)) == ROWS[trainer]
    assert grid.width > 2 * MIN_CELL  # two 32-pixel columns, enlarged to MIN_CELL each
    captions = (samples / "captions.txt").read_text().splitlines()
    assert len(captions) == 2 and captions[0].startswith("0: a ")


def test_validation_leaves_the_training_random_streams_alone(make_config, tmp_path):
    plain = _train("ct_controlnet", make_config, output_dir=str(tmp_path / "plain"))
    validated = _train("ct_controlnet", make_config, output_dir=str(tmp_path / "validated"), validation__interval=1,
                       validation__num_images=2, validation__sample_steps=1)  # fmt: skip
    assert validated.summary["ranks"][0]["weights_sha256"] == plain.summary["ranks"][0]["weights_sha256"]
    assert (validated.output_dir / "samples" / sample_name(4)).is_file() and not (plain.output_dir / "samples").exists()


def test_prompts_replace_the_captions(make_config):
    result = _train("lcd", make_config, train__max_steps=1, validation__interval=1, validation__prompts=["a red square", "a blue square", "x"])
    captions = (result.output_dir / "samples" / "captions.txt").read_text().splitlines()
    assert captions == ["0: a red square", "1: a blue square", "2: x"]


def test_grid_rows_show_the_images_they_are_given():
    red = torch.zeros(2, 3, 16, 16)
    red[:, 0] = 1
    mask = torch.ones(2, 4, 16, 16)  # a 4-channel map is shown by its first three channels
    grid = grid_image([("red", red), ("mask", mask)])
    assert grid.size == (8 + 7 * 4 + 2 * (MIN_CELL + 2) + 2, 14 + 2 * (MIN_CELL + 2) + 2)
    x = 8 + 7 * 4 + 2 + MIN_CELL // 2
    assert grid.getpixel((x, 14 + 2 + MIN_CELL // 2)) == (255, 0, 0)
    assert grid.getpixel((x, 14 + 2 + MIN_CELL + 2 + MIN_CELL // 2)) == (255, 255, 255)
