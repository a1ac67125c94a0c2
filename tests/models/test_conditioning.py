"""Conditioning: one text-conditioning value for both families through the controlled UNet."""

from __future__ import annotations

import pytest
import torch

from ccm_sdk.models.conditioning import Conditioning, as_conditioning, cat_conditioning
from ccm_sdk.models.controlled_unet import Control, controlled_unet
from ccm_sdk.models.controlnet import controlnet_from_unet
from ccm_sdk.testing import tiny


def _added(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {"text_embeds": torch.randn(batch, tiny.SDXL_POOLED_DIM, generator=g), "time_ids": torch.rand(batch, 6, generator=g) * 64}


def test_tensor_is_sd_conditioning_and_cat_puts_parts_in_order():
    hidden = torch.randn(2, 5, 8)
    assert as_conditioning(hidden).encoder_hidden_states is hidden and as_conditioning(hidden).added_cond_kwargs is None
    assert torch.equal(cat_conditioning([hidden, hidden + 1]).encoder_hidden_states, torch.cat([hidden, hidden + 1]))
    a, b = Conditioning(hidden, _added(2, 0)), Conditioning(hidden + 1, _added(2, 1))
    both = cat_conditioning([a, b])
    assert both.batch == 4
    assert torch.equal(both.added_cond_kwargs["time_ids"], torch.cat([a.added_cond_kwargs["time_ids"], b.added_cond_kwargs["time_ids"]]))
    with pytest.raises(ValueError, match="differ in their keys"):
        cat_conditioning([a, hidden])


def test_controlled_unet_passes_added_conditions_to_controlnet_and_unet():
    unet = tiny.tiny_sdxl_unet()
    controlnet = tiny.tiny_controlnet(unet, seed=3)
    x, image = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    cond = Conditioning(torch.randn(2, 77, unet.config.cross_attention_dim), _added(2, 2))
    timestep_cond = torch.randn(2, tiny.GUIDANCE_EMBED_DIM)
    with torch.no_grad():
        got = controlled_unet(unet, x, 500, cond, [Control(controlnet, image, 0.8)], timestep_cond=timestep_cond)
        down, mid = controlnet(x, 500, encoder_hidden_states=cond.encoder_hidden_states, controlnet_cond=image, conditioning_scale=0.8,
                               added_cond_kwargs=cond.added_cond_kwargs, return_dict=False)  # fmt: skip
        want = unet(x, 500, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=timestep_cond,
                    added_cond_kwargs=cond.added_cond_kwargs, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample  # fmt: skip
        other = controlled_unet(unet, x, 500, Conditioning(cond.encoder_hidden_states, _added(2, 9)), [Control(controlnet, image, 0.8)],
                                timestep_cond=timestep_cond)  # fmt: skip
    assert torch.equal(got, want)
    assert (got - other).abs().max() > 1e-4  # the pooled embedding and time ids reach the networks


def test_controlnet_from_sdxl_unet_copies_the_added_embedding():
    unet = tiny.tiny_sdxl_unet()
    controlnet = controlnet_from_unet(unet, conditioning_embedding_out_channels=tiny.CONTROL_EMBED_CHANNELS)
    assert controlnet.config.addition_embed_type == "text_time"
    for key, value in unet.add_embedding.state_dict().items():
        assert torch.equal(controlnet.add_embedding.state_dict()[key], value)
