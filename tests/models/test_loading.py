"""Model folders and hub ids: the offline cache path, and errors that name the bad file."""

from __future__ import annotations

import shutil

import pytest

from ccm_sdk.errors import CorruptWeightsError, MissingModelError
from ccm_sdk.models.loading import check_component_folder, read_json, resolve_model_path
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
