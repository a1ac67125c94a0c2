"""Configs: every shipped example validates; files, overrides and the errors for unknown keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ccm_sdk.errors import InputError, UnknownNameError
from ccm_sdk.registry import trainers
from ccm_sdk.training.config import (
    LoraSection,
    TrainConfig,
    describe_config,
    dump_config,
    leaf_keys,
    load_config,
    resolve_key,
)
from ccm_sdk.training.ct_controlnet import CTControlNetTrainConfig

SHIPPED = sorted((Path(__file__).parents[2] / "configs" / "train").glob("*.yaml"))
WORLD = [path for path in SHIPPED if path.stem.startswith("world-")]  # ready to run offline on the embedded world


def test_one_shipped_config_per_builtin_trainer():
    builtin = [e.name for e in trainers.entries() if e.plugin == "ccm_sdk.builtin.trainers"]
    assert sorted(p.stem for p in SHIPPED if p not in WORLD) == builtin


@pytest.mark.parametrize("path", [p for p in SHIPPED if p not in WORLD], ids=lambda p: p.stem)
def test_shipped_config_validates(path):
    config = load_config(path.stem, path)
    assert type(config) is trainers.get(path.stem).config_class
    assert config.trainer == path.stem
    assert load_config(None, path) == config  # the file names its trainer


def _world_or_skip() -> None:
    from ccm_sdk.errors import MissingModelError
    from ccm_sdk.models.loading import resolve_model_path
    from ccm_sdk.registry import datasets

    if "world" not in datasets:
        pytest.skip("the ccm-world plugin is not installed")
    try:
        resolve_model_path("world:lcm")
    except (MissingModelError, UnknownNameError):
        pytest.skip("the world's models are not installed")


@pytest.mark.parametrize(("path", "trainer", "model"), [
    (Path(__file__).parents[2] / "configs" / "train" / "world-ct-sketch.yaml", "ct_controlnet", "world:lcm"),
    (Path(__file__).parents[2] / "configs" / "train" / "world-dm-sketch.yaml", "dm_controlnet", "world:teacher"),
], ids=["ct", "dm"])  # fmt: skip
def test_world_configs_run_offline_on_the_embedded_world(path, trainer, model):
    _world_or_skip()
    from ccm_sdk.models.loading import resolve_model_path

    assert path in WORLD
    config = load_config(None, path)
    assert (config.trainer, config.model, config.condition) == (trainer, model, "sketch")
    assert config.data.path is None and config.data.dataset.name == "world" and config.train.max_steps == 300
    assert (resolve_model_path(config.model) / "model_index.json").is_file()  # in the repository: no download
    sample = config.data.dataset.build()[0]
    assert sample["image"].shape == (3, 64, 64)
    assert sample["controls"][config.data.control_key].shape == (3, 64, 64)  # the trainer reads the world's own maps


@pytest.mark.slow
@pytest.mark.parametrize("name", ["world-ct-sketch", "world-dm-sketch"])
def test_world_configs_train_a_few_steps(name, tmp_path):
    _world_or_skip()
    from ccm_sdk.training import train

    path = Path(__file__).parents[2] / "configs" / "train" / f"{name}.yaml"
    config = load_config(None, path, [("output_dir", str(tmp_path)), ("max_steps", 2), ("checkpoint.every", 2),
                                      ("validation.interval", None), ("log.progress", False), ("log.plot", False)])  # fmt: skip
    result = train(config)
    assert (tmp_path / "controlnet" / "config.json").is_file()
    assert json.loads((tmp_path / "training_summary.json").read_text())["steps"] == 2
    assert result is not None


def _write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else __import__("yaml").safe_dump(data))
    return path


def test_yaml_and_json_files_and_overrides(tmp_path):
    base = {"output_dir": "out", "model": "m", "train": {"lr": 1e-3}}
    for name in ("c.yaml", "c.json"):
        config = load_config("ct_controlnet", _write(tmp_path, base, name), [
            ("train.lr", 1e-4), ("max_steps", 10), ("consistency.distance", "huber"), ("consistency.w_range", [2.0, 9.0]),
        ])  # fmt: skip
        assert (config.train.lr, config.train.max_steps) == (1e-4, 10)
        assert config.consistency.distance == "huber" and config.consistency.w_range == (2.0, 9.0)
        assert config.train.batch_size == 4  # untouched defaults stay


def test_overrides_alone_and_list_entries():
    config = load_config("adapter", None, [
        ("output_dir", "o"), ("model", "m"), ("controlnets.0.path", "cn"), ("controlnets.0.condition", "canny"),
        ("controlnets.1", {"path": "cn2", "condition": "sr"}), ("adapter.hidden_ratio", 0.5),
    ])  # fmt: skip
    assert [c.condition for c in config.controlnets] == ["canny", "sr"] and config.adapter.hidden_ratio == 0.5


def test_unknown_key_in_a_file_names_it_and_lists_the_accepted_ones(tmp_path):
    path = _write(tmp_path, {"output_dir": "o", "model": "m", "train": {"max_step": 10}})
    with pytest.raises(InputError) as info:
        load_config("dm_controlnet", path)
    message = str(info.value)
    assert "'train.max_step'" in message and "did you mean 'max_steps'" in message and "lr, " in message


def test_unknown_override_key_names_it_and_lists_the_accepted_ones():
    with pytest.raises(InputError) as info:
        load_config("lcd", None, [("output_dir", "o"), ("model", "m"), ("train.max_step", 3)])
    assert "'train.max_step'" in str(info.value) and "max_steps" in str(info.value)
    with pytest.raises(InputError, match="unknown key 'bogus'"):
        load_config("lcd", None, [("bogus", 1)])


def test_top_level_unknown_key_and_missing_required(tmp_path):
    with pytest.raises(InputError) as info:
        load_config("dreambooth", _write(tmp_path, {"output_dir": "o", "model": "m", "instance_promt": "x"}))
    message = str(info.value)
    assert "'instance_promt'" in message and "instance_prompt" in message and "'instance_prompt' is required" in message


def test_invalid_values_say_what_came():
    with pytest.raises(InputError, match="consistency.distance"):
        load_config("ct_controlnet", None, [("output_dir", "o"), ("model", "m"), ("consistency.distance", "cosine")])
    with pytest.raises(InputError, match="w_min <= w_max"):
        load_config("lcd", None, [("output_dir", "o"), ("model", "m"), ("w_min", 9.0), ("w_max", 2.0)])
    with pytest.raises(InputError, match="needs class_prompt"):
        load_config("dreambooth", None, [("output_dir", "o"), ("model", "m"), ("instance_prompt", "p"), ("with_prior_preservation", True)])


def test_trainer_name_checks(tmp_path):
    path = _write(tmp_path, {"trainer": "lcd", "output_dir": "o", "model": "m"})
    with pytest.raises(InputError, match="for trainer 'lcd', not 'adapter'"):
        load_config("adapter", path)
    with pytest.raises(UnknownNameError, match="unknown trainer 'gan'; available: adapter, ct_controlnet, dm_controlnet"):
        load_config("gan", None)
    with pytest.raises(InputError, match="no trainer named"):
        load_config(None, _write(tmp_path, {"output_dir": "o"}, "n.yaml"))


def test_bare_keys_resolve_to_their_section_unless_two_sections_share_them():
    assert resolve_key(CTControlNetTrainConfig, "every") == ["checkpoint", "every"]
    assert resolve_key(CTControlNetTrainConfig, "seed") == ["train", "seed"]  # validation's own is sample_seed
    assert resolve_key(CTControlNetTrainConfig, "interval") == ["validation", "interval"]
    assert resolve_key(CTControlNetTrainConfig, "distance") == ["consistency", "distance"]

    class Both(TrainConfig):
        trainer: str = "both"
        first: LoraSection = LoraSection()
        second: LoraSection = LoraSection()

    assert "first.rank" in leaf_keys(Both) and "second.rank" in leaf_keys(Both)
    with pytest.raises(InputError, match="ambiguous.*first.rank, second.rank"):
        resolve_key(Both, "rank")


def test_dump_round_trips(tmp_path):
    config = load_config("ct_controlnet", None, [("output_dir", "o"), ("model", "m"), ("consistency.w_range", [1, 2])])
    assert load_config(None, dump_config(config, tmp_path / "x.yaml")) == config


def test_describe():
    text = describe_config(CTControlNetTrainConfig)
    assert "consistency.distance = 'l1'" in text and "model = (required)" in text


@pytest.mark.parametrize("path", WORLD, ids=lambda p: p.stem)
def test_world_configs_validate(path):
    """Every world-*.yaml names its trainer and validates (the experiments' configs included)."""
    config = load_config(None, path)
    assert type(config) is trainers.get(config.trainer).config_class
    assert config.data.dataset is not None and config.data.dataset.name == "world"
