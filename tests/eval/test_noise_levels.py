"""One consistency step from each noise level: the error by hand, determinism, the table, the plot, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ccm_sdk.errors import InputError, ShapeError
from ccm_sdk.eval.noise_levels import (
    NoiseLevelCurve,
    consistency_error_by_level,
    error_by_noise_level,
    markdown_table,
    plot_curves,
    save_curves,
)
from ccm_sdk.training.ct import grid_timesteps
from ccm_sdk.pipeline import CCMPipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def pipe(lcm_dir):
    pipe = CCMPipeline.from_pretrained(lcm_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_error_is_one_img2img_step_against_the_images(pipe, images):
    curve = error_by_noise_level(pipe, PROMPTS, images, [0.1, 1.0], seed=5, batch_size=2)
    assert curve.metric == "reconstruction" and len(curve.errors) == 2
    assert curve.timesteps[0] < curve.timesteps[1] == 999
    # by hand, batches of 2 with seeds 5 and 7 (seed + the batch's first index)
    parts = []
    for start, seed in ((0, 5), (2, 7)):
        out = pipe(PROMPTS[start:start + 2], image=images[start:start + 2], strength=0.1, num_inference_steps=1,
                   generator=torch.Generator().manual_seed(seed), output_type="pt").images  # fmt: skip
        parts.append((out - images[start:start + 2]).abs().mean(dim=(1, 2, 3)))
    assert curve.errors[0] == pytest.approx(torch.cat(parts).mean().item(), rel=1e-6)
    assert curve.errors[0] < curve.errors[1]  # less noise, less to recover
    again = error_by_noise_level(pipe, PROMPTS, images, [0.1, 1.0], seed=5, batch_size=2)
    assert again.errors == curve.errors


def test_a_controlnet_gets_its_maps(lcm_dir, controlnet_dir, images, control_image):
    pipe = CCMPipeline.from_pretrained(lcm_dir, controlnet=str(controlnet_dir))
    pipe.set_progress_bar_config(disable=True)
    maps = control_image.expand(3, -1, -1, -1)
    full = error_by_noise_level(pipe, PROMPTS, images, [0.5], control_image=maps, label="cn")
    zero = error_by_noise_level(pipe, PROMPTS, images, [0.5], control_image=torch.zeros_like(maps), label="cn")
    assert full.label == "cn" and full.errors != zero.errors  # the map reaches the ControlNet
    with pytest.raises(ShapeError, match="one control map per image"):
        error_by_noise_level(pipe, PROMPTS, images, [0.5], control_image=maps[:2])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"images": torch.rand(3, 1, 64, 64)}, ShapeError, r"\[B, 3, H, W\]"),
        ({"prompts": PROMPTS[:2]}, InputError, "one prompt per image"),
        ({"strengths": [0.0]}, InputError, r"strengths in \(0, 1\]"),
        ({"strengths": [1.5]}, InputError, r"strengths in \(0, 1\]"),
        ({"strengths": []}, InputError, r"strengths in \(0, 1\]"),
        ({"batch_size": 0}, InputError, "batch_size"),
    ],
)
def test_bad_input_says_what_was_expected(pipe, images, kwargs, error, match):
    args = {"prompts": PROMPTS, "images": images, "strengths": [0.5], **kwargs}
    with pytest.raises(error, match=match):
        error_by_noise_level(pipe, args.pop("prompts"), args.pop("images"), args.pop("strengths"), **args)


def test_table_json_and_plot(tmp_path):
    base = NoiseLevelCurve("no control", [499, 999], [0.1, 0.2])
    other = NoiseLevelCurve("controlnet", [499, 999], [0.05, 0.3])
    table = markdown_table([base, other])
    assert table.splitlines()[0] == "| model | t=499 | t=999 |"
    assert "| no control | 0.1000 | 0.2000 |" in table and "| controlnet | 0.0500 (0.50x) | 0.3000 (1.50x) |" in table
    saved = json.loads(save_curves([base, other], tmp_path / "c.json").read_text())
    assert saved[1] == {"label": "controlnet", "metric": "reconstruction", "timesteps": [499, 999], "errors": [0.05, 0.3]}
    assert plot_curves([base, other], tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="different timesteps"):
        markdown_table([base, NoiseLevelCurve("x", [499], [0.1])])
    with pytest.raises(InputError, match="at least one curve"):
        markdown_table([])


def test_the_consistency_error_is_the_ct_loss_on_held_out_images(pipe, images):
    curve = consistency_error_by_level(pipe, PROMPTS, images, [0, 30], seed=4, guidance_scale=8.0)
    assert curve.metric == "consistency" and curve.timesteps == [39, 639]
    # by hand: posterior-mean latents, one noise, the UNet with the w-embedding of guidance 8, f at both ends
    latents = pipe.encode_image(images, height=64, width=64, batch=3)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    prompt = pipe.prepare_prompt(PROMPTS, guidance_scale=8.0, num_images_per_prompt=1, do_cfg=False)
    for n, value in zip([0, 30], curve.errors):
        ends = []
        for t in (int(t) for t in grid_timesteps(pipe.schedule, 50, torch.tensor([n]))):
            x = pipe.schedule.add_noise(latents, noise, t)
            with torch.no_grad():
                eps = pipe.unet(x, t, encoder_hidden_states=prompt.embeds, timestep_cond=prompt.timestep_cond).sample
            ends.append(pipe.schedule.consistency(eps, x, t)[0])
        assert value == pytest.approx((ends[1] - ends[0]).abs().mean().item(), rel=1e-5)
    with pytest.raises(InputError, match=r"grid indices in 0..48"):
        consistency_error_by_level(pipe, PROMPTS, images, [49])


def test_the_consistency_error_runs_the_controlnet(lcm_dir, controlnet_dir, images, control_image):
    pipe = CCMPipeline.from_pretrained(lcm_dir, controlnet=str(controlnet_dir))
    maps = control_image.expand(3, -1, -1, -1)
    full = consistency_error_by_level(pipe, PROMPTS, images, [10], control_image=maps, batch_size=2)
    zero = consistency_error_by_level(pipe, PROMPTS, images, [10], control_image=torch.zeros_like(maps), batch_size=2)
    assert full.errors != zero.errors and all(e > 0 for e in full.errors)


def test_both_measures_run_on_an_sdxl_model(sdxl_lcm_dir, images):
    """The SDXL UNet needs pooled embeddings and size/crop time ids (added_cond_kwargs) at every call."""
    pipe = CCMPipeline.from_pretrained(sdxl_lcm_dir)
    pipe.set_progress_bar_config(disable=True)
    consistency = consistency_error_by_level(pipe, PROMPTS, images, [0, 30], seed=4)
    again = consistency_error_by_level(pipe, PROMPTS, images, [0, 30], seed=4)
    assert consistency.errors == again.errors and all(0 < e < float("inf") for e in consistency.errors)
    one_step = error_by_noise_level(pipe, PROMPTS, images, [0.5, 1.0])
    assert all(0 < e < float("inf") for e in one_step.errors)
