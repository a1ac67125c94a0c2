"""Config files and dotted overrides (ccm_sdk.utils.config_files)."""

from __future__ import annotations

import pytest

from ccm_sdk.errors import InputError
from ccm_sdk.utils.config_files import parse_assignments, parse_value, read_config_file, set_path


def test_yaml_json_and_empty_files(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  lr: 1.0e-4\nname: x\n")
    (tmp_path / "b.json").write_text('{"train": {"lr": 0.001}}')
    (tmp_path / "empty.yml").write_text("")
    assert read_config_file(tmp_path / "a.yaml") == {"train": {"lr": 1e-4}, "name": "x"}
    assert read_config_file(str(tmp_path / "b.json")) == {"train": {"lr": 0.001}}
    assert read_config_file(tmp_path / "empty.yml") == {}


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="should hold a mapping, got list"):
        read_config_file(tmp_path / "list.yaml")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot be parsed"):
        read_config_file(tmp_path / "broken.json")


def test_set_path_makes_sections_and_list_entries():
    raw = {"train": {"lr": 1}, "conditions": [{"name": "a"}]}
    set_path(raw, ["train", "lr"], 2)
    set_path(raw, ["optim", "betas", "0"], 0.9)
    set_path(raw, ["conditions", "0", "scale"], 0.5)
    set_path(raw, ["conditions", "1", "name"], "b")
    assert raw == {"train": {"lr": 2}, "optim": {"betas": [0.9]}, "conditions": [{"name": "a", "scale": 0.5}, {"name": "b"}]}


def test_set_path_refuses_to_go_through_a_value_or_past_a_list_end():
    with pytest.raises(InputError, match="train.lr is 1, not a section"):
        set_path({"train": {"lr": 1}}, ["train", "lr", "x"], 2)
    with pytest.raises(InputError, match="the list has 1 entries"):
        set_path({"items": [1]}, ["items", "3"], 2)


def test_values_parse_as_json_when_they_can():
    assert parse_value("1e-4") == 1e-4 and parse_value("true") is True and parse_value("[8, 16]") == [8, 16]
    assert parse_value("null") is None and parse_value("a photo of sks dog") == "a photo of sks dog"


def test_assignments():
    assert parse_assignments(["vae.seed=3", " name = x", "tags=[1, 2]", "empty="]) == [
        ("vae.seed", 3), ("name", " x"), ("tags", [1, 2]), ("empty", "")
    ]
    with pytest.raises(InputError, match="--set expects KEY=VALUE, got 'vae.seed'"):
        parse_assignments(["vae.seed"])
    with pytest.raises(InputError, match="--option expects KEY=VALUE"):
        parse_assignments(["=3"], option="--option")
