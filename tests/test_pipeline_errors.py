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
    InputTypeError,
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
    with pytest.raises(ImageSizeError, match="height: expected a positive multiple of the VAE factor 8, got 60"):
        pipe("x", torch.rand(1, 3, 60, 64))


@pytest.fixture()
def no_work(pipe, monkeypatch):
    """Fails the test if the call encodes a prompt or runs the UNet: the checks must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a network ran before the arguments were checked")

    monkeypatch.setattr(pipe, "_encode_text", forbidden)
    monkeypatch.setattr(pipe.unet, "forward", forbidden)
    return pipe


NAN, INF = float("nan"), float("inf")
BAD_ARGUMENTS = [
    # (keyword arguments of the call, error type, message)
    ({"prompt": None}, InputTypeError, "prompt: expected a str or a non-empty list of str, got NoneType None"),
    ({"prompt": ["a", 3]}, InputTypeError, r"prompt: expected a str or a non-empty list of str, got list \['a', 3\]"),
    ({"prompt": []}, InputTypeError, r"prompt: expected a str or a non-empty list of str, got list \[\]"),
    ({"negative_prompt": 5}, InputTypeError, "negative_prompt: expected None, a str or a list of str, got int 5"),
    ({"prompt": ["a", "b"], "negative_prompt": ["n"]}, InputError, r"expected 2 negative prompts \(one per prompt\), got 1"),
    ({"negative_prompt": []}, InputError, r"expected 1 negative prompts \(one per prompt\), got 0"),
    ({"num_images_per_prompt": 0}, ValueRangeError, "num_images_per_prompt: expected an int >= 1, got 0"),
    ({"num_images_per_prompt": -2}, ValueRangeError, "num_images_per_prompt: expected an int >= 1, got -2"),
    ({"num_images_per_prompt": True}, InputTypeError, "num_images_per_prompt: expected an int >= 1, got bool True"),
    ({"num_images_per_prompt": 2.0}, InputTypeError, "num_images_per_prompt: expected an int >= 1, got float 2.0"),
    ({"num_images_per_prompt": 10**9}, ValueRangeError, r"a batch of 1000000000 images of 64x64 needs at least \d+\.\d GiB .* more than this cpu device's"),
    ({"num_inference_steps": True}, StepCountError, "expected 1..50 steps for the 'consistency' sampler, got True"),
    ({"num_inference_steps": 2.5}, StepCountError, "expected 1..50 steps for the 'consistency' sampler, got 2.5"),
    ({"guidance_scale": "8"}, InputTypeError, "guidance_scale: expected a real number, got str '8'"),
    ({"guidance_scale": NAN}, NonFiniteError, "guidance_scale: expected a finite number, got nan"),
    ({"guidance_scale": INF}, NonFiniteError, "guidance_scale: expected a finite number, got inf"),
    ({"guidance_scale": -5}, ValueRangeError, r"guidance_scale: expected a number in \[0, 100\], got -5"),
    ({"guidance_scale": 1e9}, ValueRangeError, r"guidance_scale: expected a number in \[0, 100\], got 1e\+09"),
    ({"controlnet_conditioning_scale": "1"}, InputTypeError, "controlnet_conditioning_scale: expected a real number, got str '1'"),
    ({"controlnet_conditioning_scale": NAN}, NonFiniteError, "controlnet_conditioning_scale: expected a finite number, got nan"),
    ({"controlnet_conditioning_scale": 11.0}, ValueRangeError, r"controlnet_conditioning_scale: expected a number in \[-10, 10\], got 11"),
    ({"controlnet_conditioning_scale": [NAN]}, NonFiniteError, r"controlnet_conditioning_scale\[0\]: expected a finite number, got nan"),
    ({"controlnet_conditioning_scale": [1.0, 1.0]}, InputError, "expected 1 values of controlnet_conditioning_scale .one per ControlNet., got 2"),
    ({"control_guidance_start": NAN}, NonFiniteError, "control_guidance_start: expected a finite number, got nan"),
    ({"control_guidance_end": "1"}, InputTypeError, "control_guidance_end: expected a real number, got str '1'"),
    ({"strength": 0}, ValueRangeError, r"strength: expected a number in \(0, 1\], got 0"),
    ({"strength": 1.5}, ValueRangeError, r"strength: expected a number in \(0, 1\], got 1.5"),
    ({"strength": NAN}, NonFiniteError, "strength: expected a finite number, got nan"),
    ({"strength": "0.5"}, InputTypeError, "strength: expected a real number, got str '0.5'"),
    ({"strength": 0.5}, InputError, "strength: 0.5 < 1 needs an init image"),
    ({"height": 0, "width": 64}, ImageSizeError, "height: expected a positive multiple of the VAE factor 8, got 0"),
    ({"height": 64, "width": -64}, ImageSizeError, "width: expected a positive multiple of the VAE factor 8, got -64"),
    ({"height": 64, "width": 60}, ImageSizeError, "width: expected a positive multiple of the VAE factor 8, got 60"),
    ({"height": 64.0, "width": 64}, InputTypeError, "height: expected an int .pixels., got float 64.0"),
    ({"height": "64", "width": 64}, InputTypeError, "height: expected an int .pixels., got str '64'"),
    ({"generator": 0}, InputTypeError, "generator: expected a torch.Generator or a list of them, got int 0"),
    ({"generator": [torch.Generator(), torch.Generator()]}, InputError, "generator: expected 1 generators .one per image., got 2"),
    ({"generator": [7]}, InputTypeError, "generator: expected a list of torch.Generator, got one int 7"),
    ({"output_type": "jpeg"}, InputError, "output_type: expected one of 'pil', 'np', 'pt', 'latent', got 'jpeg'"),
    ({"latents": [[0.0]]}, InputTypeError, "latents: expected a torch.Tensor or None, got list"),
    ({"sampler": 5}, InputTypeError, "sampler: expected a sampler name .str. or a Sampler, got int 5"),
    ({"sampler": None}, InputTypeError, "sampler: expected a sampler name .str. or a Sampler, got NoneType None"),
    ({"callback": 5}, InputTypeError, "callback: expected None or a callable taking the step's dict, got int 5"),
    ({"condition": 5}, InputTypeError, r"condition: expected a condition name \(str\), a Condition or a callable, got int 5"),
    ({"condition": ["canny", 3.0]}, InputError, r"expected one condition per control image \(1\), got 2"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"), BAD_ARGUMENTS, ids=[" ".join(f"{k}={v!r}" for k, v in c[0].items()) for c in BAD_ARGUMENTS]
)
def test_bad_arguments_fail_before_any_network_runs(no_work, control_image, kwargs, error, message):
    kwargs = {"prompt": "x", **kwargs}
    with pytest.raises(error, match=message):
        no_work(kwargs.pop("prompt"), control_image, **kwargs)


def test_checks_come_before_the_condition_runs(no_work):
    calls = []

    def condition(image):
        calls.append(image)
        return image

    with pytest.raises(NonFiniteError, match="guidance_scale"):
        no_work("x", torch.rand(1, 3, 64, 64), condition=condition, guidance_scale=NAN)
    assert calls == []


def test_generators_one_per_image_of_every_prompt(no_work, control_image):
    with pytest.raises(InputError, match="expected 4 generators .one per image., got 2"):
        no_work(["a", "b"], control_image, num_images_per_prompt=2, generator=[torch.Generator(), torch.Generator()])


def test_accepted_edge_values(pipe, control_image):
    """The ends of the documented ranges, numpy scalars and tuples are taken."""
    import numpy as np

    out = pipe(("a",), control_image, num_inference_steps=np.int64(1), guidance_scale=np.float32(0.0),
               controlnet_conditioning_scale=(-10.0,), generator=(torch.Generator().manual_seed(0),), output_type="latent")
    assert out.images.shape == (1, 4, 8, 8)


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


def test_a_tuple_of_generators_works_as_a_list(pipe, control_image):
    """A tuple passes the checks (a list or tuple, one per image), so it must also sample, the same as a list."""
    as_tuple = pipe("x", control_image, generator=(torch.Generator().manual_seed(3),), output_type="pt").images
    as_list = pipe("x", control_image, generator=[torch.Generator().manual_seed(3)], output_type="pt").images
    assert torch.equal(as_tuple, as_list)
