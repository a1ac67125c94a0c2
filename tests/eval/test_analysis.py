"""The correlation analysis: residual cosine similarity and radial spectra, on tiny ControlNets."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ccm_sdk.errors import InputError, ShapeError
from ccm_sdk.eval.analysis import (
    CorrelationResult,
    compare_controlnets,
    controlnet_residuals,
    correlation_analysis,
    cosine_similarity,
    radial_spectrum,
    residual_names,
    reverse_transfer_method,
)
from ccm_sdk.eval.config import PaperModels
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.schedule import NoiseSchedule
from ccm_sdk.testing import tiny


@pytest.fixture(scope="module")
def nets():
    unet = tiny.tiny_unet()
    return tiny.tiny_controlnet(unet, seed=1), tiny.tiny_controlnet(unet, seed=2)


def _negated(net):
    """The same ControlNet with every output (zero) convolution negated: all residuals flip sign."""
    negated = copy.deepcopy(net)
    with torch.no_grad():
        for conv in [*negated.controlnet_down_blocks, negated.controlnet_mid_block]:
            conv.weight.neg_()
            conv.bias.neg_()
    return negated


def _inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return dict(
        latents=torch.randn(batch, 4, 4, 4, generator=g),
        prompt_embeds=torch.randn(batch, 5, tiny.TEXT_DIM, generator=g),
        controls=torch.rand(batch, 3, 32, 32, generator=g),
        schedule=NoiseSchedule.from_scheduler_config(dict(tiny.lcm_scheduler().config)),
    )


def test_identical_nets_give_cosine_one_and_equal_spectra(nets):
    result = compare_controlnets(nets[0], nets[0], timesteps=[999, 500, 20], **_inputs())
    assert result.names == residual_names(len(result.names)) and result.names[-1] == "mid"
    np.testing.assert_allclose(result.cosine_mean, 1.0, atol=1e-6)
    np.testing.assert_allclose(result.cosine_std, 0.0, atol=1e-6)
    for a, b in zip(result.spectra_a, result.spectra_b):
        np.testing.assert_allclose(a, b)


def test_a_net_and_its_negation_give_cosine_minus_one(nets):
    result = compare_controlnets(nets[0], _negated(nets[0]), timesteps=[700, 100], **_inputs())
    np.testing.assert_allclose(result.cosine_mean, -1.0, atol=1e-6)
    for a, b in zip(result.spectra_a, result.spectra_b):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # |F(-x)| = |F(x)|


def test_different_nets_lie_strictly_between(nets):
    result = compare_controlnets(nets[0], nets[1], timesteps=[500], **_inputs())
    assert all(-1 < c < 1 for c in result.cosine_mean)
    assert result.num_samples == 2 and result.timesteps == [500]


def test_residuals_are_down_blocks_then_mid(nets):
    inputs = _inputs(1)
    residuals = controlnet_residuals(nets[0], inputs["latents"], 10, inputs["prompt_embeds"], inputs["controls"])
    assert len(residuals) == len(nets[0].controlnet_down_blocks) + 1
    assert residuals[-1].shape[-1] <= residuals[0].shape[-1]


def test_residuals_are_the_controlnets_own_at_the_given_scale(nets):
    inputs = _inputs(1)
    got = controlnet_residuals(nets[0], inputs["latents"], 10, inputs["prompt_embeds"], inputs["controls"], conditioning_scale=0.3)
    with torch.no_grad():
        down, mid = nets[0](inputs["latents"], 10, encoder_hidden_states=inputs["prompt_embeds"], controlnet_cond=inputs["controls"],
                            conditioning_scale=0.3, return_dict=False)  # fmt: skip
    assert all(torch.equal(g, e) for g, e in zip(got, [*down, mid], strict=True))


def test_radial_spectrum_of_constant_and_cosine_maps():
    constant = torch.full((1, 2, 16, 16), 3.0)
    freqs, spectrum = radial_spectrum(constant)
    assert len(freqs) == 9 and freqs[-1] == pytest.approx(0.5)
    assert spectrum[0] == pytest.approx(3.0 * 256) and np.allclose(spectrum[1:], 0, atol=1e-9)
    x = torch.arange(16, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * 3 * x / 16).expand(16, 16)[None, None]
    freqs, spectrum = radial_spectrum(wave)
    assert int(np.argmax(spectrum)) == 3 and freqs[3] == pytest.approx(3 / 16)


def test_cosine_of_zero_residual_is_nan_and_shapes_must_match():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.rand(2, 3, 4, 4)
    assert torch.isnan(cosine_similarity(a, b)).all()
    with pytest.raises(ShapeError):
        cosine_similarity(b, torch.rand(2, 3, 4, 5))
    with pytest.raises(ShapeError):
        radial_spectrum(torch.rand(4, 4))


def test_analysis_on_real_inputs_through_a_pipeline_and_its_plot(lcm_dir, controlnet_dir, controlnet_b_dir, tmp_path):
    pipe = CCMPipeline.from_pretrained(lcm_dir)
    images, controls = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    result = correlation_analysis(pipe, str(controlnet_dir), str(controlnet_b_dir), images=images, captions=["a", "b"],
                                  controls=controls, timesteps=[900, 300], label_a="DM", label_b="CM")  # fmt: skip
    assert isinstance(result, CorrelationResult) and len(result.cosine_mean) == len(result.names)
    assert result.plot(tmp_path / "c.png").stat().st_size > 1000
    assert result.save_json(tmp_path / "c.json").is_file()
    same = correlation_analysis(pipe, str(controlnet_dir), str(controlnet_dir), images=images, captions=["a", "b"],
                                controls=controls, timesteps=[500])  # fmt: skip
    np.testing.assert_allclose(same.cosine_mean, 1.0, atol=1e-6)
    with pytest.raises(ShapeError, match="one caption"):
        correlation_analysis(pipe, str(controlnet_dir), str(controlnet_dir), images=images, captions=["a"], controls=controls)


def test_no_timesteps_or_mismatched_batches_raise(nets):
    with pytest.raises(InputError, match="at least one timestep"):
        compare_controlnets(nets[0], nets[1], timesteps=[], **_inputs())
    inputs = _inputs()
    inputs["controls"] = inputs["controls"][:1]
    with pytest.raises(ShapeError, match="one batch size"):
        compare_controlnets(nets[0], nets[1], timesteps=[10], **inputs)


def test_reverse_transfer_is_the_cm_controlnet_on_the_dm():
    method = reverse_transfer_method(PaperModels(dm="dm", cm="cm", cm_controlnets={"sketch": "cm-sketch"}, dm_steps=[50]))
    assert method.name == "CM's ControlNet + DM" and method.model == "dm" and method.sampler == "ddim"
    assert method.controlnets == {"sketch": "cm-sketch"} and method.steps == [50] and method.guidance_scale == 7.5
