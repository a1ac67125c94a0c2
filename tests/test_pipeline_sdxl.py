"""CCMPipeline's SDXL family: recognising the layout, typed errors, and the features both families share."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ccm_sdk.errors import IncompatibleModelsError, InputError, MissingModelError
from ccm_sdk.models.adapter import UnifiedAdapter
from ccm_sdk.models.sdxl import MicroConditioning
from ccm_sdk.pipeline import CCMPipeline


@pytest.fixture(scope="module")
def pipe(sdxl_lcm_dir, sdxl_controlnet_dir):
    pipe = CCMPipeline.from_pretrained(sdxl_lcm_dir, controlnet=sdxl_controlnet_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(pipe, control, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return pipe("a red circle", control, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs)


def _edit_index(folder, **changes):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    for key, value in changes.items():
        if value is None:
            index.pop(key)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_family_comes_from_the_folder(lcm_dir, sdxl_lcm_dir):
    sd = CCMPipeline.from_pretrained(lcm_dir)
    xl = CCMPipeline.from_pretrained(sdxl_lcm_dir)
    assert not sd.is_sdxl and sd.text_encoder_2 is None
    assert xl.is_sdxl and xl.text_encoder_2 is not None and xl.tokenizer_2 is not None
    assert "text_encoder_2" in xl.modules() and "text_encoder_2" not in sd.modules()
    # both encoders' penultimate hidden states side by side; the pooled embedding from the second
    embeds, _ = xl.encode_prompt("a cat")
    assert embeds.shape[-1] == xl.unet.config.cross_attention_dim == xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    prompt = xl.prepare_prompt("a cat", guidance_scale=8.0, num_images_per_prompt=3, do_cfg=False)
    assert prompt.pooled.shape == (3, xl.text_encoder_2.config.projection_dim)
    assert prompt.embeds.shape[0] == 3 and prompt.negative is None


def test_text_encoder_2_with_a_plain_unet_is_a_typed_error(tmp_path, sd_dir, sdxl_lcm_dir):
    mixed = shutil.copytree(sd_dir, tmp_path / "mixed")
    for name in ("text_encoder_2", "tokenizer_2"):
        shutil.copytree(sdxl_lcm_dir / name, mixed / name)
    _edit_index(mixed, text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"])
    with pytest.raises(IncompatibleModelsError, match="addition_embed_type is None.*expected 'text_time'"):
        CCMPipeline.from_pretrained(mixed)


def test_sdxl_unet_without_second_encoder_is_a_typed_error(tmp_path, sdxl_lcm_dir):
    refiner_like = shutil.copytree(sdxl_lcm_dir, tmp_path / "one-encoder")
    _edit_index(refiner_like, text_encoder_2=None, tokenizer_2=None)
    with pytest.raises(IncompatibleModelsError, match="lists no text_encoder_2/tokenizer_2"):
        CCMPipeline.from_pretrained(refiner_like)
    half = shutil.copytree(sdxl_lcm_dir, tmp_path / "half")
    _edit_index(half, tokenizer_2=None)
    with pytest.raises(MissingModelError, match="lists 'text_encoder_2' but no 'tokenizer_2'"):
        CCMPipeline.from_pretrained(half)


def test_constructor_checks_the_family_and_encoder_sizes(pipe, lcm_dir):
    parts = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                 scheduler_config=pipe.schedule.scheduler_config)  # fmt: skip
    with pytest.raises(IncompatibleModelsError, match="expected text_encoder_2 and tokenizer_2"):
        CCMPipeline(**parts)
    with pytest.raises(IncompatibleModelsError, match="together"):
        CCMPipeline(**parts, text_encoder_2=pipe.text_encoder_2)
    sd = CCMPipeline.from_pretrained(lcm_dir)
    with pytest.raises(IncompatibleModelsError, match="expected 'text_time'"):
        CCMPipeline(**{**parts, "unet": sd.unet}, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    with pytest.raises(IncompatibleModelsError, match="hidden sizes"):  # the second encoder given twice: the widths do not add up
        CCMPipeline(**{**parts, "text_encoder": pipe.text_encoder_2}, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)


def test_sd_controlnet_does_not_fit_an_sdxl_unet(pipe, controlnet_dir):
    from ccm_sdk.pipeline import load_controlnet

    with pytest.raises(IncompatibleModelsError, match="does not fit the UNet"):
        pipe.add_controlnet(load_controlnet(controlnet_dir))


def test_micro_conditioning_is_checked(pipe, lcm_dir, control_image):
    with pytest.raises(InputError, match="unknown key"):
        _gen(pipe, control_image, micro_conditioning={"orig_size": (64, 64)})
    with pytest.raises(InputError, match="original_size: expected \\(height, width\\)"):
        _gen(pipe, control_image, micro_conditioning={"original_size": 64})
    with pytest.raises(InputError, match="SDXL models only"):
        _gen(CCMPipeline.from_pretrained(lcm_dir), None, micro_conditioning={"original_size": (64, 64)})
    given = MicroConditioning(original_size=(64, 64), target_size=(64, 64))
    assert torch.equal(_gen(pipe, control_image, micro_conditioning=given).images, _gen(pipe, control_image).images)


def test_control_image_changes_the_output(pipe, control_image):
    a, b = _gen(pipe, control_image).images, _gen(pipe, control_image.flip(-1)).images
    assert (a - b).abs().mean() > 1e-3


def test_img2img_keeps_structure_at_low_strength(pipe, control_image):
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    low = _gen(pipe, control_image, image=init, strength=0.25, num_inference_steps=4)
    high = _gen(pipe, control_image, image=init, strength=1.0, num_inference_steps=4)
    decoded_init = pipe.decode_latents(pipe.encode_image(init, height=64, width=64, batch=1), output_type="pt")
    assert low.nfe == 4
    assert (low.images - decoded_init).abs().mean() < (high.images - decoded_init).abs().mean()


def test_stream_reuses_prompt_and_noise(pipe, control_image):
    outs = list(pipe.stream([control_image, control_image, control_image.flip(-1)], "a red circle", seed=5, output_type="pt"))
    assert torch.equal(outs[0].images, outs[1].images)
    assert not torch.equal(outs[0].images, outs[2].images)


def test_adapter_is_family_agnostic(sdxl_lcm_dir, sdxl_controlnet_dir, pipe, control_image):
    base = _gen(pipe, control_image).images
    adapted = CCMPipeline.from_pretrained(sdxl_lcm_dir, controlnet=sdxl_controlnet_dir)
    adapted.set_progress_bar_config(disable=True)
    adapter = UnifiedAdapter.for_controlnet(adapted.controlnets[0])
    adapted.set_adapter(adapter)
    assert torch.allclose(_gen(adapted, control_image).images, base, atol=1e-6)  # a fresh adapter is the identity
    with torch.no_grad():
        for block in adapter.blocks:
            block.conv2.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    assert (_gen(adapted, control_image).images - base).abs().mean() > 1e-4


def test_ddim_cfg_without_negative_prompt_uses_zero_embeddings_unless_the_model_says_otherwise(tmp_path, sdxl_dir, control_image):
    zeroed = CCMPipeline.from_pretrained(sdxl_dir)
    prompt = zeroed.prepare_prompt("a cat", guidance_scale=5.0, num_images_per_prompt=1, do_cfg=True)
    assert not prompt.negative.any() and not prompt.negative_pooled.any()
    folder = shutil.copytree(sdxl_dir, tmp_path / "no-zeros")
    _edit_index(folder, force_zeros_for_empty_prompt=False)
    encoded = CCMPipeline.from_pretrained(folder).prepare_prompt("a cat", guidance_scale=5.0, num_images_per_prompt=1, do_cfg=True)
    assert torch.equal(encoded.negative, zeroed.encode_prompt("", do_cfg=False)[0])
    assert encoded.negative_pooled.abs().sum() > 0


def test_save_pretrained_round_trip_loads_in_diffusers_and_here(tmp_path, sdxl_lcm_dir):
    from diffusers import StableDiffusionXLPipeline

    original = CCMPipeline.from_pretrained(sdxl_lcm_dir)
    original.set_progress_bar_config(disable=True)
    saved = original.save_pretrained(tmp_path / "saved")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    StableDiffusionXLPipeline.from_pretrained(saved)  # diffusers takes the layout
    again = CCMPipeline.from_pretrained(saved)
    again.set_progress_bar_config(disable=True)
    assert again.is_sdxl and len(again.controlnets) == 0
    assert torch.equal(_gen(again, None, height=64, width=64).images, _gen(original, None, height=64, width=64).images)


def test_replacing_the_unet_keeps_the_rest(sdxl_dir, sdxl_lcm_dir):
    swapped = CCMPipeline.from_pretrained(sdxl_dir, unet=sdxl_lcm_dir / "unet")
    assert swapped.is_sdxl and swapped.is_lcm
    given = CCMPipeline.from_pretrained(sdxl_dir, unet=swapped.unet)
    assert given.unet is swapped.unet


def test_float16_vae_is_upcast_when_its_config_asks(sdxl_lcm_dir):
    half = CCMPipeline.from_pretrained(sdxl_lcm_dir).to(dtype=torch.float16)
    assert half.vae.config.force_upcast
    seen = []
    hook = half.vae.decoder.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    latents = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    try:
        images = half.decode_latents(latents, output_type="pt")
    finally:
        hook.remove()
    assert seen == [torch.float32] and torch.isfinite(images).all()
    assert half.vae.decoder.conv_in.weight.dtype == torch.float16  # back to the pipeline's dtype afterwards
    encoded = half.encode_image(torch.rand(1, 3, 64, 64), height=64, width=64, batch=1)
    assert encoded.dtype == torch.float16 and half.vae.encoder.conv_in.weight.dtype == torch.float16
