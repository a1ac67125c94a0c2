"""CCMPipeline behaviour: control matters, outputs, img2img, streaming, adapters, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ccm_sdk import get_sampler
from ccm_sdk.models.adapter import UnifiedAdapter
from ccm_sdk.pipeline import CCMPipeline


@pytest.fixture(scope="module")
def pipe(lcm_dir, controlnet_dir):
    p = CCMPipeline.from_pretrained(lcm_dir, controlnet=controlnet_dir)
    p.set_progress_bar_config(disable=True)
    return p


def _gen(pipe, control, seed=0, **kw):
    return pipe("a red circle", control, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw)


def test_control_image_changes_the_output(pipe, control_image):
    a = _gen(pipe, control_image).images
    b = _gen(pipe, control_image.flip(-1)).images
    assert (a - b).abs().mean() > 1e-3
    off = _gen(pipe, control_image, controlnet_conditioning_scale=0.0).images
    off2 = _gen(pipe, control_image.flip(-1), controlnet_conditioning_scale=0.0).images
    assert torch.equal(off, off2)  # scale 0: the control image no longer matters


def test_seed_determinism_and_output_types(pipe, control_image):
    a = _gen(pipe, control_image, seed=3).images
    b = _gen(pipe, control_image, seed=3).images
    assert torch.equal(a, b) and a.shape == (1, 3, 64, 64) and 0 <= a.min() and a.max() <= 1
    as_np = pipe("x", control_image, generator=torch.Generator().manual_seed(3), output_type="np").images
    as_pil = pipe("x", control_image, generator=torch.Generator().manual_seed(3), output_type="pil").images
    assert as_np.shape == (1, 64, 64, 3) and isinstance(as_pil[0], Image.Image) and as_pil[0].size == (64, 64)
    latents = pipe("x", control_image, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)


def test_control_image_accepts_pil_numpy_and_tensor(pipe, control_image):
    array = (control_image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    outs = [_gen(pipe, c).images for c in (Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1).float() / 255)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_nfe_and_timings(pipe, control_image):
    out = _gen(pipe, control_image, num_inference_steps=3)
    assert out.nfe == 3 and len(out.step_seconds) == 3
    assert set(out.timings) == {"encode_prompt", "prepare", "denoise", "decode", "total"}
    assert out.timings["total"] >= out.timings["denoise"] > 0


def test_guidance_embedding_is_remembered_only_under_inference_mode(pipe, control_image):
    a, b = _gen(pipe, control_image, guidance_scale=8.0).images, _gen(pipe, control_image, guidance_scale=2.0).images
    assert (a - b).abs().max() > 1e-4  # each scale gets its own w-embedding
    assert torch.equal(_gen(pipe, control_image, guidance_scale=8.0).images, a)
    fresh = pipe.prepare_prompt("a red circle", guidance_scale=8.0, num_images_per_prompt=1, do_cfg=False)
    assert not fresh.timestep_cond.is_inference()  # usable where autograd runs, e.g. in training
    with torch.inference_mode():
        remembered = pipe.prepare_prompt("a red circle", guidance_scale=8.0, num_images_per_prompt=1, do_cfg=False)
    assert torch.equal(fresh.timestep_cond, remembered.timestep_cond)


def test_callback_and_batch(pipe, control_image):
    seen = []
    out = pipe(["a", "b"], control_image, num_images_per_prompt=2, callback=lambda d: seen.append(d["i"]), output_type="pt")
    assert out.images.shape[0] == 4 and seen == [0, 1, 2, 3]


def test_condition_preprocesses_raw_images(pipe):
    photo = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    from ccm_sdk import get_condition

    direct = _gen(pipe, get_condition("canny")(photo)).images
    via_name = _gen(pipe, photo, condition="canny").images
    assert torch.equal(direct, via_name)


def test_img2img_keeps_structure_at_low_strength(pipe, control_image):
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    seen = []
    low = _gen(pipe, control_image, image=init, strength=0.25, num_inference_steps=4, callback=lambda d: seen.append(d["t"]))
    high = _gen(pipe, control_image, image=init, strength=1.0, num_inference_steps=4)
    # LCM img2img keeps the step count and restricts it to the first quarter of the noise levels
    assert low.nfe == 4 and max(seen) < 250
    decoded_init = pipe.decode_latents(pipe.encode_image(init, height=64, width=64, batch=1), output_type="pt")
    assert (low.images - decoded_init).abs().mean() < (high.images - decoded_init).abs().mean()


def test_stream_reuses_prompt_and_noise(pipe, control_image):
    frames = [control_image, control_image, control_image.flip(-1)]
    outs = list(pipe.stream(frames, "a red circle", seed=5, output_type="pt"))
    assert len(outs) == 3
    assert torch.equal(outs[0].images, outs[1].images)  # same frame, same noise: same image
    assert not torch.equal(outs[0].images, outs[2].images)
    assert outs[0].timings["encode_prompt"] == 0.0 or outs[0].timings["encode_prompt"] < 1e-3


def test_fresh_adapter_is_identity_and_trained_one_changes_output(pipe, controlnet_dir, lcm_dir, control_image):
    base = _gen(pipe, control_image).images
    adapted = CCMPipeline.from_pretrained(lcm_dir, controlnet=controlnet_dir)
    adapted.set_progress_bar_config(disable=True)
    adapter = UnifiedAdapter.for_controlnet(adapted.controlnets[0])
    adapted.set_adapter(adapter)
    assert torch.allclose(_gen(adapted, control_image).images, base, atol=1e-6)
    with torch.no_grad():
        for block in adapter.blocks:
            block.conv2.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    assert (_gen(adapted, control_image).images - base).abs().mean() > 1e-4


def test_save_pretrained_round_trip(tmp_path, pipe, control_image):
    adapter = UnifiedAdapter.for_controlnet(pipe.controlnets[0])
    with torch.no_grad():
        for block in adapter.blocks:
            block.conv2.bias.fill_(0.01)
    pipe.set_adapter(adapter)
    try:
        before = _gen(pipe, control_image).images
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        pipe.set_adapter(None)
    loaded = CCMPipeline.from_pretrained(tmp_path / "saved", controlnet=tmp_path / "saved" / "controlnet_0", adapter=tmp_path / "saved" / "adapter")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_gen(loaded, control_image).images, before)
    # the saved folder is a regular diffusers model too
    from diffusers import LatentConsistencyModelPipeline

    LatentConsistencyModelPipeline.from_pretrained(tmp_path / "saved", safety_checker=None, requires_safety_checker=False)


def test_ddim_baseline_and_tcd_run_on_an_lcm(pipe, control_image):
    ddim = _gen(pipe, control_image, sampler="ddim", num_inference_steps=10)
    assert ddim.nfe == 10  # the LCM's w-embedding replaces CFG: one evaluation per step
    tcd = _gen(pipe, control_image, sampler=get_sampler("consistency", gamma=0.3))
    assert tcd.images.shape == (1, 3, 64, 64)


def test_no_controlnet_is_plain_text_to_image(lcm_dir):
    pipe = CCMPipeline.from_pretrained(lcm_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", height=32, width=48, output_type="pt")
    assert out.images.shape == (1, 3, 32, 48)


def test_set_controlnets_replaces_and_checks(pipe, controlnet_dir, lcm_dir, control_image):
    from diffusers import UNet2DConditionModel

    from ccm_sdk.errors import IncompatibleModelsError
    from ccm_sdk.pipeline import load_controlnet
    from ccm_sdk.testing import tiny

    fresh = CCMPipeline.from_pretrained(lcm_dir)
    fresh.set_progress_bar_config(disable=True)
    fresh.set_controlnets([load_controlnet(controlnet_dir)])
    assert torch.equal(_gen(fresh, control_image).images, _gen(pipe, control_image).images)
    unet = UNet2DConditionModel.from_pretrained(lcm_dir / "unet")
    wrong = tiny.tiny_controlnet(UNet2DConditionModel(**{**unet.config, "block_out_channels": (16, 32), "time_cond_proj_dim": None}))
    with pytest.raises(IncompatibleModelsError):
        fresh.set_controlnets([wrong])
    assert len(fresh.controlnets) == 1  # unchanged after the refusal


def test_fast_path_stays_close_to_the_exact_path(lcm_dir, controlnet_dir, control_image):
    exact = CCMPipeline.from_pretrained(lcm_dir, controlnet=controlnet_dir)
    fast = CCMPipeline.from_pretrained(lcm_dir, controlnet=controlnet_dir).enable_fast_path()
    for p in (exact, fast):
        p.set_progress_bar_config(disable=True)
    has_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert fast.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = _gen(exact, control_image).images, _gen(fast, control_image).images.float()
    assert b.shape == a.shape and (a - b).abs().mean() < 0.02
