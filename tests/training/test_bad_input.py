"""Bad input stops training early with a typed error that says what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ccm_sdk.errors import (
    ChannelMismatchError,
    ImageSizeError,
    InputError,
    TrainingError,
)
from ccm_sdk.training.checkpoint import list_checkpoints
from ccm_sdk.training.ct_controlnet import CTControlNetTrainer


def test_unknown_config_key(make_config):
    raw = make_config("ct_controlnet").model_dump()
    raw["consistency"]["num_point"] = 20
    expected = r"unknown key 'consistency.num_point' \(did you mean 'num_points'\?\).*accepted in consistency: .*num_points"
    with pytest.raises(InputError, match=expected):
        CTControlNetTrainer(raw)


def test_controlnet_channels_that_do_not_fit_the_condition(make_config, controlnet_dir):
    config = make_config("ct_controlnet", controlnet=str(controlnet_dir), condition="mask")
    with pytest.raises(ChannelMismatchError, match="takes 3 conditioning channels but condition 'mask' makes 4"):
        CTControlNetTrainer(config).setup()
    # a new ControlNet is built with the condition's channel count
    trainer = CTControlNetTrainer(make_config("ct_controlnet", condition="mask"))
    trainer.setup()
    assert trainer.unwrapped().config.conditioning_channels == 4


def test_empty_dataset(make_config, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(TrainingError, match="holds no images"):
        CTControlNetTrainer(make_config("ct_controlnet", data__path=str(tmp_path / "empty"))).setup()


def test_unreadable_dataset(make_config, tmp_path, make_squares):
    with pytest.raises(TrainingError, match="does not exist"):
        CTControlNetTrainer(make_config("ct_controlnet", data__path=str(tmp_path / "nowhere"))).setup()
    folder = make_squares(tmp_path / "broken", count=3)
    (folder / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    with pytest.raises(TrainingError, match="cannot read image .*img1.png"):
        CTControlNetTrainer(make_config("ct_controlnet", data__path=str(folder))).setup()


def test_images_of_mixed_sizes(make_config, tmp_path, make_squares):
    folder = make_squares(tmp_path / "mixed", count=3)
    Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(folder / "img2.png")
    with pytest.raises(ImageSizeError, match="different sizes.*48x40.*set data.resolution"):
        CTControlNetTrainer(make_config("ct_controlnet", data__path=str(folder))).setup()
    trainer = CTControlNetTrainer(make_config("ct_controlnet", data__path=str(folder), data__resolution=32, train__max_steps=2))
    assert trainer.train().step == 2  # the documented fix: resize and center-crop


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(make_config):
    class Diverging(CTControlNetTrainer):
        calls = 0

        def compute_loss(self, inputs, draws):
            Diverging.calls += 1
            loss = super().compute_loss(inputs, draws)
            return loss * float("nan") if Diverging.calls == 3 else loss

    config = make_config("ct_controlnet", train__max_steps=6, checkpoint__every=1, checkpoint__keep_last=5)
    trainer = Diverging(config)
    with pytest.raises(TrainingError, match=r"loss is nan at step 3.*last good checkpoint is .*step-00000002.*--resume"):
        trainer.train()
    checkpoints = list_checkpoints(f"{config.output_dir}/checkpoints")
    assert [step for step, _ in checkpoints] == [1, 2]
    weights = load_file(str(checkpoints[-1][1] / "weights" / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped().parameters())  # the NaN step was not applied


def test_an_sdxl_base_is_refused_with_a_typed_error(make_config, sdxl_lcm_dir):
    from ccm_sdk.errors import IncompatibleModelsError

    config = make_config("ct_controlnet", model=str(sdxl_lcm_dir))
    with pytest.raises(IncompatibleModelsError, match="SDXL-family base is not supported yet"):
        CTControlNetTrainer(config).setup()
