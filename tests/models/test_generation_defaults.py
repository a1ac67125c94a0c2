"""ccm_defaults.json: what a model folder recommends for generation, and the pipeline using it
whenever a call leaves the setting unset."""

from __future__ import annotations

import json

import pytest
import torch

from ccm_sdk import CCMPipeline
from ccm_sdk.errors import CorruptWeightsError, InputTypeError
from ccm_sdk.models.generation_defaults import FILE, GUIDANCE_SCALE, GenerationDefaults, read_generation_defaults, write_generation_defaults


def test_a_folder_without_the_file_gets_the_sdk_default_and_a_written_file_reads_back(tmp_path):
    assert read_generation_defaults(tmp_path).guidance_scale == GUIDANCE_SCALE == 8.0
    write_generation_defaults(tmp_path, GenerationDefaults(guidance_scale=3.5))
    assert json.loads((tmp_path / FILE).read_text()) == {"guidance_scale": 3.5}
    assert read_generation_defaults(tmp_path) == GenerationDefaults(guidance_scale=3.5)
    assert write_generation_defaults(tmp_path, GenerationDefaults()) is None and not (tmp_path / FILE).exists()  # nothing to say


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"guidance_scale": 3, "steps": 4}', "steps: Extra inputs are not permitted"),
        ('{"guidance_scale": -1}', "guidance_scale: Input should be greater than or equal to 0"),
        ('{"guidance_scale": NaN}', "guidance_scale: Input should be a finite number"),
        ('{"guidance_scale": "high"}', "guidance_scale: Input should be a valid number"),
        ("[3]", "Input should be a valid dictionary"),
    ],
)
def test_a_malformed_file_names_itself_and_what_is_wrong(tmp_path, text, message):
    (tmp_path / FILE).write_text(text)
    with pytest.raises(CorruptWeightsError, match=FILE) as error:
        read_generation_defaults(tmp_path)
    assert message in str(error.value)


def test_the_pipeline_samples_with_the_folders_scale_when_the_call_leaves_it_unset(lcm_dir, tmp_path):
    pipe = CCMPipeline.from_pretrained(lcm_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.generation_defaults.guidance_scale == 8.0
    pipe.generation_defaults = GenerationDefaults(guidance_scale=3.0)
    folder = pipe.save_pretrained(tmp_path / "lcm")
    loaded = CCMPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.generation_defaults.guidance_scale == 3.0

    def run(**kwargs):
        return loaded("a red square", num_inference_steps=1, height=32, width=32, output_type="pt",
                      generator=torch.Generator().manual_seed(0), **kwargs).images  # fmt: skip

    # an LCM reads the scale through its w-embedding: unset is exactly 3.0, and differs from 8.0
    assert torch.equal(run(), run(guidance_scale=3.0)) and not torch.equal(run(), run(guidance_scale=8.0))
    with pytest.raises(InputTypeError, match="generation_defaults: expected a GenerationDefaults or None, got dict"):
        CCMPipeline(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                    scheduler_config=pipe.schedule.scheduler_config, generation_defaults={"guidance_scale": 3})  # fmt: skip
