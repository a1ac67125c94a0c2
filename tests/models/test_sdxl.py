"""The SDXL family helpers: recognising a text_time model, the encoders' size checks, the time ids."""

from __future__ import annotations

import pytest

from ccm_sdk.errors import IncompatibleModelsError, InputError, InputTypeError
from ccm_sdk.models.sdxl import MicroConditioning, check_sdxl_models, takes_text_time
from ccm_sdk.testing import tiny


def test_takes_text_time_reads_the_config():
    assert takes_text_time(tiny.tiny_sdxl_unet().config)
    assert not takes_text_time(tiny.tiny_unet().config)


def test_encoder_sizes_are_checked_against_the_unet():
    tokenizer = tiny.offline_clip_tokenizer()
    unet, first, second = tiny.tiny_sdxl_unet(), tiny.tiny_text_encoder(tokenizer), tiny.tiny_sdxl_text_encoder_2(tokenizer)
    check_sdxl_models(unet, first, second)
    with pytest.raises(IncompatibleModelsError, match="cross_attention_dim"):
        check_sdxl_models(unet, second, second)
    second.config.projection_dim += 1  # the pooled embedding no longer fills the added embedding's input
    with pytest.raises(IncompatibleModelsError, match="added embedding takes 72 inputs"):
        check_sdxl_models(unet, first, second)


def test_time_ids_follow_diffusers_defaults():
    assert MicroConditioning().time_ids(96, 64) == ([96, 64, 0, 0, 96, 64], [96, 64, 0, 0, 96, 64])
    only_one = MicroConditioning(negative_original_size=(8, 8))  # diffusers needs both negative sizes
    assert only_one.time_ids(32, 32)[1] == [32, 32, 0, 0, 32, 32]
    both = MicroConditioning(crops_coords_top_left=(2, 3), negative_original_size=(8, 9), negative_target_size=(10, 11))
    assert both.time_ids(32, 48) == ([32, 48, 2, 3, 32, 48], [8, 9, 0, 0, 10, 11])


def test_coerce_checks_keys_and_pairs():
    assert MicroConditioning.coerce(None) == MicroConditioning()
    assert MicroConditioning.coerce({"original_size": [128, 96]}).original_size == (128, 96)
    given = MicroConditioning(target_size=(8, 8))
    assert MicroConditioning.coerce(given) == given
    with pytest.raises(InputError, match="unknown key"):
        MicroConditioning.coerce({"size": (1, 1)})
    with pytest.raises(InputError, match="crops_coords_top_left"):
        MicroConditioning.coerce({"crops_coords_top_left": None})
    with pytest.raises(InputError, match="target_size"):
        MicroConditioning.coerce({"target_size": (64, -1)})
    with pytest.raises(InputTypeError, match="got str"):
        MicroConditioning.coerce("1024")
