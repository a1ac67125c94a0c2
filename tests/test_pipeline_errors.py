"""Bad input at the pipeline's boundary: one typed, explicit error per case."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel

from ccm_sdk.errors import (
    ChannelMismatchError,
    CorruptWeightsError,
    ImageSizeError,
    IncompatibleModelsError,
    InputError,
    MissingModelError,
    NonFiniteError,
    StepCountError,
    UnknownNameError,
    ValueRangeError,
)
from ccm_sdk.models.controlnet import controlnet_from_unet
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.testing import tiny


@pytest.fixture(scope="module")
def pipe(lcm_dir, controlnet_dir):
    p = CCMPipeline.from_pretrained(lcm_dir, controlnet=controlnet_dir)
    p.set_progress_bar_config(disable=True)
    return p


def test_control_image_size_must_match_output(pipe, control_image):
    with pytest.raises(ImageSizeError, match="control image 0 is 64x64 but the output is 128x128"):
        pipe("x", control_image, height=128, width=128)


def test_size_must_be_divisible_by_vae_factor(pipe):
    with pytest.raises(ImageSizeError, match="multiples of the VAE factor 8, got 60x64"):
        pipe("x", torch.rand(1, 3, 60, 64))


def test_wrong_channel_count_for_controlnet(pipe):
    with pytest.raises(ChannelMismatchError, match="has 4 channels but ControlNet 0 takes 3"):
        pipe("x", torch.rand(1, 4, 64, 64))


def test_nan_control_image(pipe):
    image = torch.rand(1, 3, 64, 64)
    image[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        pipe("x", image)


def test_out_of_range_control_image(pipe):
    image = torch.full((1, 3, 64, 64), 0.5)
    image[0, 1, 2, 3] = -1.5
    with pytest.raises(ValueRangeError, match=r"expected image values in \[0, 1\], got \[-1.5, 0.5\]"):
        pipe("x", image)


@pytest.mark.parametrize("steps", [0, 51])
def test_consistency_steps_out_of_range(pipe, control_image, steps):
    with pytest.raises(StepCountError, match=f"expected 1..50 steps for the 'consistency' sampler, got {steps}"):
        pipe("x", control_image, num_inference_steps=steps)


def test_unknown_sampler_name(pipe, control_image):
    with pytest.raises(UnknownNameError, match="unknown sampler 'heun'"):
        pipe("x", control_image, sampler="heun")


def test_unknown_condition_name(pipe, control_image):
    with pytest.raises(UnknownNameError, match="unknown condition 'scribbles'"):
        pipe("x", control_image, condition="scribbles")


def test_one_control_image_per_controlnet(pipe):
    with pytest.raises(InputError, match="expected 1 control image"):
        pipe("x")


def test_guidance_window_must_be_ordered(pipe, control_image):
    with pytest.raises(InputError, match="control_guidance_start < control_guidance_end"):
        pipe("x", control_image, control_guidance_start=0.8, control_guidance_end=0.2)


def test_latents_of_wrong_shape(pipe, control_image):
    with pytest.raises(InputError, match=r"expected latents of shape \(1, 4, 8, 8\)"):
        pipe("x", control_image, latents=torch.zeros(1, 4, 16, 16))


def test_nan_latents(pipe, control_image):
    with pytest.raises(NonFiniteError, match="latents"):
        pipe("x", control_image, latents=torch.full((1, 4, 8, 8), float("nan")))


def test_incompatible_unet_controlnet_pair(lcm_dir, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(lcm_dir / "unet")
    other = UNet2DConditionModel(**{**unet.config, "block_out_channels": (16, 32), "time_cond_proj_dim": None})
    tiny.tiny_controlnet(other).save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(IncompatibleModelsError, match=r"block_out_channels is \[16, 32\] in the ControlNet but \[32, 64\] in the UNet"):
        CCMPipeline.from_pretrained(lcm_dir, controlnet=tmp_path / "other")


def test_controlnet_embedding_must_match_vae_factor(lcm_dir):
    unet = UNet2DConditionModel.from_pretrained(lcm_dir / "unet")
    net = controlnet_from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    with pytest.raises(IncompatibleModelsError, match="downsamples by 2 but the VAE by 8"):
        CCMPipeline.from_pretrained(lcm_dir, controlnet=net)


def test_missing_model_folder(tmp_path):
    with pytest.raises(MissingModelError, match="does not exist"):
        CCMPipeline.from_pretrained(tmp_path / "nope")


def test_missing_component(tmp_path, lcm_dir):
    broken = shutil.copytree(lcm_dir, tmp_path / "m")
    shutil.rmtree(broken / "vae")
    with pytest.raises(MissingModelError, match="vae: folder .* is missing"):
        CCMPipeline.from_pretrained(broken)


def test_corrupt_safetensors(tmp_path, lcm_dir):
    broken = shutil.copytree(lcm_dir, tmp_path / "m")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CorruptWeightsError, match="not a valid safetensors file"):
        CCMPipeline.from_pretrained(broken)


def test_corrupt_config_json(tmp_path, lcm_dir):
    broken = shutil.copytree(lcm_dir, tmp_path / "m")
    (broken / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(CorruptWeightsError, match="not valid JSON"):
        CCMPipeline.from_pretrained(broken)


def test_unknown_hub_repo_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingModelError, match="not in the hub cache; offline mode"):
        CCMPipeline.from_pretrained("someone/some-lcm")


def test_not_a_lora_checkpoint(lcm_dir, controlnet_dir):
    pipe = CCMPipeline.from_pretrained(lcm_dir)
    with pytest.raises(IncompatibleModelsError, match="not a LoRA checkpoint"):
        pipe.load_lora(controlnet_dir)
