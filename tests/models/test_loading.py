"""Model folders and hub ids: the offline cache path, and errors that name the bad file."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from ccm_sdk.errors import CorruptWeightsError, InputTypeError, MissingModelError, MissingWeightsError, UnknownConfigKeyError
from ccm_sdk.models.loading import check_component_folder, read_json, resolve_model_path, unknown_config_keys
from ccm_sdk.pipeline import CCMPipeline


def _fake_hub_cache(cache, repo_id, source):
    """Lay ``source`` out as huggingface_hub's cache does after a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_hub_id_resolves_from_cache_offline(monkeypatch, tmp_path, lcm_dir, controlnet_dir):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = _fake_hub_cache(tmp_path, "someone/tiny-lcm", lcm_dir)
    _fake_hub_cache(tmp_path, "someone/tiny-controlnet", controlnet_dir)
    assert resolve_model_path("someone/tiny-lcm", local_files_only=True) == snapshot
    pipe = CCMPipeline.from_pretrained("someone/tiny-lcm", controlnet="someone/tiny-controlnet", local_files_only=True)
    assert len(pipe.controlnets) == 1


def test_hf_hub_offline_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingModelError, match="offline mode"):
        resolve_model_path("owner/missing")


def test_paths_that_are_not_repo_ids(tmp_path):
    with pytest.raises(MissingModelError, match="not a hub repo id"):
        resolve_model_path(tmp_path / "a" / "b" / "c")
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(MissingModelError, match="is a file"):
        resolve_model_path(file)


def test_only_safetensors_weights_are_accepted(tmp_path, controlnet_dir):
    folder = shutil.copytree(controlnet_dir, tmp_path / "cn")
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(MissingModelError, match="no .safetensors weights .* only safetensors"):
        check_component_folder(folder, what="ControlNet")


def test_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CorruptWeightsError, match="should hold a JSON object, got list"):
        read_json(tmp_path / "config.json", what="x")


def test_truncated_safetensors(tmp_path, controlnet_dir):
    folder = shutil.copytree(controlnet_dir, tmp_path / "cn")
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptWeightsError, match="diffusion_pytorch_model.safetensors"):
        check_component_folder(folder, what="ControlNet")


# --- strict loading: what diffusers would only warn about --------------------------------

WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "controlnet": "diffusion_pytorch_model.safetensors"}


def _broken_copy(tmp_path, lcm_dir, controlnet_dir, component):
    """A copy of the tiny model and its ControlNet; ``(model, controlnet, folder of component)``."""
    model = shutil.copytree(lcm_dir, tmp_path / "model")
    controlnet = shutil.copytree(controlnet_dir, tmp_path / "controlnet")
    return model, controlnet, controlnet if component == "controlnet" else model / component


def _drop_tensor(file):
    """Delete one tensor from a safetensors file; return its name."""
    from safetensors.torch import load_file, save_file

    state = load_file(file)
    name = sorted(state)[len(state) // 2]
    del state[name]
    save_file(state, file, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "controlnet"])
def test_a_missing_tensor_is_an_error_that_names_it(tmp_path, lcm_dir, controlnet_dir, component):
    model, controlnet, folder = _broken_copy(tmp_path, lcm_dir, controlnet_dir, component)
    name = _drop_tensor(folder / WEIGHTS[component])
    for strict in (True, False):  # no opt-out: a model with a part left on the meta device only fails later, as NaN
        with pytest.raises(MissingWeightsError, match=rf"lack 1 tensor\(s\) that \w+ needs: {re.escape(name)}"):
            CCMPipeline.from_pretrained(model, controlnet=controlnet, strict=strict)


@pytest.mark.parametrize("component", ["unet", "vae", "controlnet"])
def test_an_unknown_config_key_is_an_error_that_names_it(tmp_path, lcm_dir, controlnet_dir, component):
    model, controlnet, folder = _broken_copy(tmp_path, lcm_dir, controlnet_dir, component)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channel": [1], "zz_typo": 1}))
    with pytest.raises(UnknownConfigKeyError, match=r"does not take: block_out_channel, zz_typo; .* pass strict=False"):
        CCMPipeline.from_pretrained(model, controlnet=controlnet)
    with pytest.warns(UserWarning, match=r"does not take: block_out_channel, zz_typo; .*; ignored \(strict=False\)"):
        pipe = CCMPipeline.from_pretrained(model, controlnet=controlnet, strict=False)
    assert all(p.device.type != "meta" for module in pipe.modules().values() for p in module.parameters())


def test_metadata_keys_and_real_configs_pass():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    sd15_vae = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu", "in_channels": 3,
                "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512}
    assert unknown_config_keys(AutoencoderKL, sd15_vae) == []
    assert unknown_config_keys(UNet2DConditionModel, {"_name_or_path": "x", "cross_attention_dim": 768}) == []
    assert unknown_config_keys(CLIPTextModel, {"dropout": 0.0}) == []  # transformers configs are not checked


def test_pipeline_repos_download_only_their_components(monkeypatch, tmp_path, sdxl_lcm_dir):
    """Root-level single-file checkpoints and weight variants of a pipeline repository stay on the hub."""
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append(kwargs)
        return str(sdxl_lcm_dir)

    def fake_file(repo_id, filename, **kwargs):
        if repo_id == "someone/unet-only":
            raise huggingface_hub.errors.LocalEntryNotFoundError("no model_index.json")
        return str(sdxl_lcm_dir / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    assert resolve_model_path("someone/tiny-sdxl", local_files_only=False) == sdxl_lcm_dir
    allow, ignore = calls[0]["allow_patterns"], calls[0]["ignore_patterns"]
    assert "model_index.json" in allow and "text_encoder_2/*.safetensors" in allow and "tokenizer_2/*.json" in allow
    assert not any(p.startswith("*") or p.startswith("**") for p in allow)  # nothing at the root but the index
    assert {"*.fp16.safetensors", "*.fp16-*.safetensors"} <= set(ignore)
    resolve_model_path("someone/unet-only", local_files_only=False)
    assert "*.safetensors" in calls[1]["allow_patterns"]  # a lone UNet or ControlNet keeps its root-level weights


@pytest.mark.parametrize("source", [5, None, 2.5, ["a/b"]])
def test_a_source_that_is_not_a_path_is_a_type_error(source):
    with pytest.raises(InputTypeError, match=r"model: expected a folder path, hub id or source:name, got "):
        CCMPipeline.from_pretrained(source)
