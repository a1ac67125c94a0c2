"""Weight loading helpers shared by model-backed conditions (ccm_sdk.conditions.weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ccm_sdk.conditions.weights import is_local_path, load_state_dict, offline, resolve_weights_file
from ccm_sdk.errors import CorruptWeightsError, MissingModelError


def test_local_paths_and_repo_ids_are_told_apart(tmp_path):
    assert is_local_path(tmp_path)
    assert is_local_path("./models/hed") and is_local_path("~/hed") and is_local_path("/abs/path")
    assert is_local_path("a/b/c")
    assert not is_local_path("lllyasviel/Annotators") and not is_local_path("gpt2")


def test_offline_follows_the_environment(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert offline(True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline(False)


def test_resolve_prefers_the_first_listed_file(tmp_path):
    (tmp_path / "b.pth").write_bytes(b"x")
    (tmp_path / "a.safetensors").write_bytes(b"x")
    assert resolve_weights_file(tmp_path, ["a.safetensors", "b.pth"]).name == "a.safetensors"
    assert resolve_weights_file(tmp_path / "b.pth", ["a.safetensors"]).name == "b.pth"  # a file is used as is


def test_resolve_missing_local_path(tmp_path):
    with pytest.raises(MissingModelError, match="does not exist"):
        resolve_weights_file(tmp_path / "absent", ["model.safetensors"])


def test_resolve_repo_id_offline_uses_only_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingModelError, match="local cache only"):
        resolve_weights_file("someone/weights", ["model.safetensors"], local_files_only=True)


def test_load_safetensors_and_torch_state_dicts(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3)}
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save(state, tmp_path / "m.pth")
    torch.testing.assert_close(load_state_dict(tmp_path / "m.safetensors")["w"], state["w"])
    torch.testing.assert_close(load_state_dict(tmp_path / "m.pth")["w"], state["w"])


def test_torch_files_are_read_without_executing_pickled_code(tmp_path):
    torch.save({"w": torch.zeros(1), "object": object()}, tmp_path / "unsafe.pth")
    with pytest.raises(CorruptWeightsError):
        load_state_dict(tmp_path / "unsafe.pth")


def test_truncated_safetensors_is_corrupt(tmp_path):
    save_file({"w": torch.zeros(64)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptWeightsError):
        load_state_dict(tmp_path / "m.safetensors")


def test_non_tensor_content_is_corrupt(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CorruptWeightsError, match="state dict"):
        load_state_dict(tmp_path / "list.pth")
