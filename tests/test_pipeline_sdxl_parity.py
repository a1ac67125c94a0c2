"""CCMPipeline on SDXL-architecture models against diffusers' SDXL pipelines on the same tiny weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, LCMScheduler, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

from ccm_sdk.pipeline import CCMPipeline

TOL = 1e-4


def _reference(model_dir, controlnet_dirs, scheduler_cls):
    nets = [ControlNetModel.from_pretrained(d) for d in controlnet_dirs]
    if nets:
        ref = StableDiffusionXLControlNetPipeline.from_pretrained(model_dir, controlnet=nets if len(nets) > 1 else nets[0], add_watermarker=False)
    else:
        ref = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _ours(model_dir, controlnet_dirs=(), **kwargs):
    pipe = CCMPipeline.from_pretrained(model_dir, controlnet=list(controlnet_dirs) or None, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("steps", [1, 4])
def test_consistency_sampling_matches_diffusers_sdxl_controlnet_lcm(sdxl_lcm_dir, sdxl_controlnet_dir, control_image, steps):
    ours = _ours(sdxl_lcm_dir, [sdxl_controlnet_dir])
    assert ours.is_sdxl and ours.is_lcm
    ref = _reference(sdxl_lcm_dir, [sdxl_controlnet_dir], LCMScheduler)
    kwargs = dict(num_inference_steps=steps, guidance_scale=6.0, output_type="np")
    a = ours("a red circle", control_image, generator=torch.Generator().manual_seed(0), **kwargs)
    b = ref("a red circle", image=control_image, generator=torch.Generator().manual_seed(0), **kwargs)
    assert a.images.shape == b.images.shape == (1, 64, 64, 3)
    assert abs(a.images - b.images).max() < TOL
    assert a.nfe == steps
    # the guidance scale reaches the UNet through the w-embedding: another scale, another image
    c = ours("a red circle", control_image, generator=torch.Generator().manual_seed(0), **{**kwargs, "guidance_scale": 2.0})
    assert abs(a.images - c.images).max() > 1e-3


def test_batch_and_images_per_prompt_match_diffusers(sdxl_lcm_dir, sdxl_controlnet_dir, control_image):
    ours = _ours(sdxl_lcm_dir, [sdxl_controlnet_dir])
    ref = _reference(sdxl_lcm_dir, [sdxl_controlnet_dir], LCMScheduler)
    kwargs = dict(num_inference_steps=4, guidance_scale=8.0, num_images_per_prompt=2, output_type="np")
    a = ours(["a cat", "a dog"], control_image, generator=torch.Generator().manual_seed(1), **kwargs)
    b = ref(["a cat", "a dog"], image=control_image, generator=torch.Generator().manual_seed(1), **kwargs)
    assert a.images.shape == (4, 64, 64, 3)
    assert abs(a.images - b.images).max() < TOL


def test_multi_controlnet_scales_and_guidance_window_match_diffusers(sdxl_lcm_dir, sdxl_controlnet_dir, sdxl_controlnet_b_dir, control_image):
    ours = _ours(sdxl_lcm_dir, [sdxl_controlnet_dir, sdxl_controlnet_b_dir])
    ref = _reference(sdxl_lcm_dir, [sdxl_controlnet_dir, sdxl_controlnet_b_dir], LCMScheduler)
    second = control_image.flip(-1)
    kwargs = dict(num_inference_steps=4, guidance_scale=7.0, controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.25],
                  control_guidance_end=[0.75, 1.0], output_type="np")
    a = ours("a cat", [control_image, second], generator=torch.Generator().manual_seed(1), **kwargs)
    b = ref("a cat", image=[control_image, second], generator=torch.Generator().manual_seed(1), **kwargs)
    assert abs(a.images - b.images).max() < TOL
    assert a.stats.controlnet_calls == 6  # A skipped at the last step, B at the first


def test_micro_conditioning_matches_diffusers_and_changes_the_image(sdxl_lcm_dir, sdxl_controlnet_dir, control_image):
    ours = _ours(sdxl_lcm_dir, [sdxl_controlnet_dir])
    ref = _reference(sdxl_lcm_dir, [sdxl_controlnet_dir], LCMScheduler)
    sizes = dict(original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(128, 96))
    kwargs = dict(num_inference_steps=2, guidance_scale=6.0, output_type="np")
    a = ours("a tree", control_image, micro_conditioning=sizes, generator=torch.Generator().manual_seed(4), **kwargs)
    b = ref("a tree", image=control_image, generator=torch.Generator().manual_seed(4), **sizes, **kwargs)
    default = ours("a tree", control_image, generator=torch.Generator().manual_seed(4), **kwargs)
    assert abs(a.images - b.images).max() < TOL
    assert abs(a.images - default.images).max() > 1e-3


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_ddim_cfg_baseline_matches_diffusers(sdxl_dir, sdxl_plain_controlnet_dir, control_image, negative_prompt):
    """None: SDXL's zero negative embeddings (force_zeros_for_empty_prompt); a text: its encodings."""
    ours = _ours(sdxl_dir, [sdxl_plain_controlnet_dir])
    assert ours.is_sdxl and not ours.is_lcm
    ref = _reference(sdxl_dir, [sdxl_plain_controlnet_dir], DDIMScheduler)
    kwargs = dict(num_inference_steps=5, guidance_scale=7.5, negative_prompt=negative_prompt, output_type="np")
    a = ours("a tree", control_image, sampler="ddim", generator=torch.Generator().manual_seed(2), **kwargs)
    b = ref("a tree", image=control_image, generator=torch.Generator().manual_seed(2), **kwargs)
    assert abs(a.images - b.images).max() < TOL
    assert a.nfe == 10  # two network evaluations per step under classifier-free guidance


def test_ddim_negative_micro_conditioning_matches_diffusers(sdxl_dir, sdxl_plain_controlnet_dir, control_image):
    ours = _ours(sdxl_dir, [sdxl_plain_controlnet_dir])
    ref = _reference(sdxl_dir, [sdxl_plain_controlnet_dir], DDIMScheduler)
    sizes = dict(negative_original_size=(32, 32), negative_crops_coords_top_left=(4, 0), negative_target_size=(48, 48))
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, negative_prompt="blurry", output_type="np")
    a = ours("a tree", control_image, sampler="ddim", micro_conditioning=sizes, generator=torch.Generator().manual_seed(3), **kwargs)
    b = ref("a tree", image=control_image, generator=torch.Generator().manual_seed(3), **sizes, **kwargs)
    plain = ours("a tree", control_image, sampler="ddim", generator=torch.Generator().manual_seed(3), **kwargs)
    assert abs(a.images - b.images).max() < TOL
    assert abs(a.images - plain.images).max() > 1e-4  # the negative half saw other time ids


@pytest.mark.parametrize(("lcm", "sampler", "scheduler_cls"), [(True, "consistency", LCMScheduler), (False, "ddim", DDIMScheduler)])
def test_text_to_image_without_controlnet_matches_diffusers_sdxl(sdxl_lcm_dir, sdxl_dir, lcm, sampler, scheduler_cls):
    model_dir = sdxl_lcm_dir if lcm else sdxl_dir
    ours = _ours(model_dir)
    ref = _reference(model_dir, [], scheduler_cls)
    kwargs = dict(num_inference_steps=4, guidance_scale=6.0, height=64, width=64, output_type="np")
    a = ours("a house", sampler=sampler, generator=torch.Generator().manual_seed(5), **kwargs)
    b = ref("a house", generator=torch.Generator().manual_seed(5), **kwargs)
    assert abs(a.images - b.images).max() < TOL


@pytest.mark.parametrize("guidance_scale", [1.0, 1.5])
def test_lcm_lora_on_plain_sdxl_matches_diffusers(tmp_path, sdxl_dir, sdxl_plain_controlnet_dir, control_image, guidance_scale):
    """Without a w-embedding, guidance above 1 is classifier-free guidance (zero negative embeddings), as in diffusers."""
    from ccm_sdk.testing.lora import save_random_unet_lora

    lora_file = save_random_unet_lora(sdxl_dir, tmp_path / "lcm-lora-sdxl")
    ours = _ours(sdxl_dir, [sdxl_plain_controlnet_dir], lora=lora_file)
    ref = _reference(sdxl_dir, [sdxl_plain_controlnet_dir], LCMScheduler)
    ref.load_lora_weights(str(lora_file))
    plain = _ours(sdxl_dir, [sdxl_plain_controlnet_dir])
    kwargs = dict(num_inference_steps=4, guidance_scale=guidance_scale, output_type="np")
    a = ours("a house", control_image, generator=torch.Generator().manual_seed(3), **kwargs)
    b = ref("a house", image=control_image, generator=torch.Generator().manual_seed(3), **kwargs)
    c = plain("a house", control_image, generator=torch.Generator().manual_seed(3), **kwargs)
    assert abs(a.images - b.images).max() < TOL
    assert abs(a.images - c.images).max() > 1e-3  # the LoRA changed the UNet
    assert a.nfe == (8 if guidance_scale > 1 else 4)
