"""The controlled UNet: ControlNets -> adapter -> UNet, against the composition written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from ccm_sdk.models.adapter import UnifiedAdapter
from ccm_sdk.models.controlled_unet import Control, controlled_unet, controlnet_residuals, summed_residuals
from ccm_sdk.schedule import guidance_embedding
from ccm_sdk.testing import tiny


@pytest.fixture(scope="module")
def nets():
    unet = tiny.tiny_unet()
    return unet, tiny.tiny_controlnet(unet, seed=1), tiny.tiny_controlnet(unet, seed=2)


@pytest.fixture(scope="module")
def adapter(nets):
    """An adapter that is not the identity, so where it is applied shows in the output."""
    adapter = UnifiedAdapter.for_controlnet(nets[1])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in adapter.blocks:
            block.conv2.weight.copy_(torch.randn(block.conv2.weight.shape, generator=generator) * 0.1)
    return adapter


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(2, 4, 8, 8, generator=g),
        t=torch.tensor([500, 20]),
        embeds=torch.randn(2, 77, tiny.TEXT_DIM, generator=g),
        images=[torch.rand(2, 3, 64, 64, generator=g) for _ in range(2)],
        timestep_cond=guidance_embedding(torch.tensor([7.0, 2.5]), tiny.GUIDANCE_EMBED_DIM),
    )


def _unet(unet, inputs, down, mid):
    return unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["embeds"], timestep_cond=inputs["timestep_cond"],
                down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip


def _controlnet(controlnet, inputs, image, scale=1.0):
    return controlnet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["embeds"], controlnet_cond=image,
                      conditioning_scale=scale, return_dict=False)  # fmt: skip


def _adapt(adapter, down, mid):
    out = [r + b.conv2(F.silu(b.conv1(r))) for b, r in zip(adapter.blocks, [*down, mid])]
    return out[:-1], out[-1]


def _run(nets, inputs, controls, **kwargs):
    return controlled_unet(nets[0], inputs["x"], inputs["t"], inputs["embeds"], controls, timestep_cond=inputs["timestep_cond"], **kwargs)


@torch.no_grad()
def test_without_controls_it_is_the_plain_unet(nets, inputs):
    assert summed_residuals([], inputs["x"], inputs["t"], inputs["embeds"]) == (None, None)
    assert torch.equal(_run(nets, inputs, []), _unet(nets[0], inputs, None, None))


@torch.no_grad()
def test_one_controlnet_matches_the_composition_by_hand(nets, inputs):
    unet, controlnet, _ = nets
    image = inputs["images"][0]
    down, mid = _controlnet(controlnet, inputs, image, 0.6)
    expected = _unet(unet, inputs, down, mid)
    assert torch.equal(_run(nets, inputs, [Control(controlnet, image, 0.6)]), expected)
    assert not torch.equal(expected, _unet(unet, inputs, None, None))  # the control really acts


@torch.no_grad()
def test_several_controlnets_are_summed_as_diffusers_multi_controlnet_sums_them(nets, inputs):
    unet, a, b = nets
    images, scales = inputs["images"], [0.7, 1.3]
    down, mid = MultiControlNetModel([a, b])(inputs["x"], inputs["t"], encoder_hidden_states=inputs["embeds"],
                                             controlnet_cond=images, conditioning_scale=scales, return_dict=False)  # fmt: skip
    controls = [Control(a, images[0], scales[0]), Control(b, images[1], scales[1])]
    got_down, got_mid = summed_residuals(controls, inputs["x"], inputs["t"], inputs["embeds"])
    assert all(torch.equal(g, e) for g, e in zip(got_down, down)) and torch.equal(got_mid, mid)
    assert torch.equal(_run(nets, inputs, controls), _unet(unet, inputs, down, mid))


@torch.no_grad()
def test_the_adapter_transforms_each_controlnet_at_scale_one_then_the_scale_applies(nets, inputs, adapter):
    unet, a, b = nets
    images, scales = inputs["images"], [0.5, 2.0]
    adapted = [_adapt(adapter, *_controlnet(net, inputs, image)) for net, image in zip((a, b), images)]
    down = [s0 * r0 + s1 * r1 for r0, r1, s0, s1 in zip(adapted[0][0], adapted[1][0], *([s] * len(adapted[0][0]) for s in scales))]
    mid = scales[0] * adapted[0][1] + scales[1] * adapted[1][1]
    controls = [Control(a, images[0], scales[0]), Control(b, images[1], scales[1])]
    got = _run(nets, inputs, controls, adapter=adapter)
    assert torch.allclose(got, _unet(unet, inputs, down, mid), atol=1e-5)
    # not the adapter applied once to the summed residuals: it is not linear
    raw = [_controlnet(net, inputs, image, s) for net, image, s in zip((a, b), images, scales)]
    summed = _adapt(adapter, [r0 + r1 for r0, r1 in zip(raw[0][0], raw[1][0])], raw[0][1] + raw[1][1])
    assert not torch.allclose(got, _unet(unet, inputs, *summed), atol=1e-3)


@torch.no_grad()
def test_at_scale_one_the_adapter_output_is_used_as_it_is(nets, inputs, adapter):
    controlnet, image = nets[1], inputs["images"][0]
    down, mid = adapter(*_controlnet(controlnet, inputs, image))
    got_down, got_mid = controlnet_residuals(controlnet, inputs["x"], inputs["t"], inputs["embeds"], image, adapter=adapter)
    assert all(torch.equal(g, e) for g, e in zip(got_down, down)) and torch.equal(got_mid, mid)


@torch.no_grad()
def test_the_guidance_embedding_reaches_the_unet(nets, inputs):
    controls = [Control(nets[1], inputs["images"][0])]
    with_w = _run(nets, inputs, controls)
    without = controlled_unet(nets[0], inputs["x"], inputs["t"], inputs["embeds"], controls)
    assert not torch.allclose(with_w, without, atol=1e-4)


def _gradients(*modules):
    return [any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for m in modules]


@pytest.mark.parametrize("controlnet_grad", [True, False])
def test_gradients_reach_the_controlnet_only_when_asked(nets, inputs, adapter, controlnet_grad):
    unet, controlnet, _ = nets
    for module in nets + (adapter,):
        module.zero_grad(set_to_none=True)
    out = _run(nets, inputs, [Control(controlnet, inputs["images"][0], 0.8)], adapter=adapter, controlnet_grad=controlnet_grad)
    out.square().mean().backward()
    try:
        assert _gradients(unet, controlnet, adapter) == [True, controlnet_grad, True]
    finally:
        for module in nets + (adapter,):
            module.zero_grad(set_to_none=True)

