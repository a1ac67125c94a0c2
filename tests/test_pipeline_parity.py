"""CCMPipeline against diffusers' StableDiffusionControlNetPipeline on the same tiny weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, LCMScheduler, StableDiffusionControlNetPipeline

from ccm_sdk.pipeline import CCMPipeline

TOL = 1e-4


def _reference(model_dir, controlnet_dirs, scheduler_cls):
    nets = [ControlNetModel.from_pretrained(d) for d in controlnet_dirs]
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        model_dir, controlnet=nets if len(nets) > 1 else nets[0], safety_checker=None, requires_safety_checker=False
    )
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_consistency_sampling_matches_diffusers_lcm(lcm_dir, controlnet_dir, control_image, steps):
    ours = CCMPipeline.from_pretrained(lcm_dir, controlnet=controlnet_dir)
    ref = _reference(lcm_dir, [controlnet_dir], LCMScheduler)
    a = ours("a red circle", control_image, num_inference_steps=steps, guidance_scale=6.0,
             generator=torch.Generator().manual_seed(0), output_type="np")
    b = ref("a red circle", image=control_image, num_inference_steps=steps, guidance_scale=6.0,
            generator=torch.Generator().manual_seed(0), output_type="np")
    assert a.images.shape == b.images.shape == (1, 64, 64, 3)
    assert abs(a.images - b.images).max() < TOL
    assert a.nfe == steps


def test_contiguous_vae_is_bit_identical_to_diffusers(lcm_dir, controlnet_dir, control_image):
    ours = CCMPipeline.from_pretrained(lcm_dir, controlnet=controlnet_dir)
    assert ours.vae_channels_last and ours.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ref = _reference(lcm_dir, [controlnet_dir], LCMScheduler)
    kwargs = dict(num_inference_steps=2, guidance_scale=6.0, output_type="np")
    b = ref("a red circle", image=control_image, generator=torch.Generator().manual_seed(0), **kwargs).images
    default = ours("a red circle", control_image, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(default - b).max() < TOL
    ours.set_vae_channels_last(False)
    assert ours.vae.decoder.conv_in.weight.is_contiguous()
    assert (ours("a red circle", control_image, generator=torch.Generator().manual_seed(0), **kwargs).images == b).all()


def test_multi_controlnet_scales_and_guidance_window_match_diffusers(lcm_dir, controlnet_dir, controlnet_b_dir, control_image):
    ours = CCMPipeline.from_pretrained(lcm_dir, controlnet=[controlnet_dir, controlnet_b_dir])
    ref = _reference(lcm_dir, [controlnet_dir, controlnet_b_dir], LCMScheduler)
    second = control_image.flip(-1)
    kwargs = dict(num_inference_steps=4, guidance_scale=7.0, controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.25],
                  control_guidance_end=[0.75, 1.0], output_type="np")
    a = ours(["a cat", "a dog"], [control_image, second], generator=torch.Generator().manual_seed(1), **kwargs)
    b = ref(["a cat", "a dog"], image=[control_image, second], generator=torch.Generator().manual_seed(1), **kwargs)
    assert abs(a.images - b.images).max() < TOL
    # the window skips ControlNet A at the last step and B at the first: 8 - 2 calls
    assert a.stats.controlnet_calls == 6


def test_ddim_cfg_baseline_matches_diffusers(sd_dir, sd_controlnet_dir, control_image):
    ours = CCMPipeline.from_pretrained(sd_dir, controlnet=sd_controlnet_dir)
    ref = _reference(sd_dir, [sd_controlnet_dir], DDIMScheduler)
    a = ours("a tree", control_image, num_inference_steps=6, guidance_scale=7.5, sampler="ddim",
             negative_prompt="blurry", generator=torch.Generator().manual_seed(2), output_type="np")
    b = ref("a tree", image=control_image, num_inference_steps=6, guidance_scale=7.5, negative_prompt="blurry",
            generator=torch.Generator().manual_seed(2), output_type="np")
    assert abs(a.images - b.images).max() < TOL
    assert a.nfe == 12  # two network evaluations per step under classifier-free guidance


def test_lcm_lora_on_plain_model_matches_diffusers(tmp_path, sd_dir, sd_controlnet_dir, control_image):
    from ccm_sdk.testing.lora import save_random_unet_lora

    lora_file = save_random_unet_lora(sd_dir, tmp_path / "lcm-lora")
    ours = CCMPipeline.from_pretrained(sd_dir, controlnet=sd_controlnet_dir, lora=lora_file)
    ref = _reference(sd_dir, [sd_controlnet_dir], LCMScheduler)
    ref.load_lora_weights(str(lora_file))
    plain = CCMPipeline.from_pretrained(sd_dir, controlnet=sd_controlnet_dir)
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, output_type="np")
    a = ours("a house", control_image, generator=torch.Generator().manual_seed(3), **kwargs)
    b = ref("a house", image=control_image, generator=torch.Generator().manual_seed(3), **kwargs)
    c = plain("a house", control_image, generator=torch.Generator().manual_seed(3), **kwargs)
    assert abs(a.images - b.images).max() < TOL
    assert abs(a.images - c.images).max() > 1e-3  # the LoRA changed the UNet
