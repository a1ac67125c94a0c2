"""Trainers as a plugin kind: the built-ins, a third-party trainer run by ``ccm train`` with a
config file (its data a registered dataset), and trainers registered wrongly."""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import Field

import ccm_sdk
from ccm_sdk import plugins
from ccm_sdk.cli import main
from ccm_sdk.errors import InputError, PluginError, UnknownNameError
from ccm_sdk.registry import trainers
from ccm_sdk.training import get_trainer, train
from ccm_sdk.training.config import TrainConfig, config_class, load_config
from ccm_sdk.training.core import Trainer

BUILTIN = ["adapter", "ct_controlnet", "dm_controlnet", "dreambooth", "lcd", "t2i", "vae"]


class ToyConfig(TrainConfig):
    model: str | None = None  # the toy starts from nothing
    scale: float = Field(default=1.0, gt=0.0, description="the regression target is scale * the image mean")


class ToyTrainer(Trainer):
    """A linear map from an image's mean colour to its mean brightness."""

    name = "test-toy"
    description = "a linear regression on mean colours (a test plugin)"
    config_class = ToyConfig

    def build(self) -> torch.nn.Module:
        return torch.nn.Linear(3, 1)

    def prepare_inputs(self, batch):
        return batch["images"].mean(dim=(2, 3)).to(self.device)

    def sample_draws(self, inputs):
        return None

    def compute_loss(self, inputs, draws):
        target = self.config.scale * inputs.mean(dim=1, keepdim=True)
        return ((self.model(inputs) - target) ** 2).mean()

    def save_outputs(self, output_dir: Path) -> dict[str, Path]:
        path = output_dir / "toy.pt"
        torch.save(self.unwrapped().state_dict(), path)
        return {"toy": path}


def grey_levels(count: int = 4, size: int = 8) -> list[dict]:
    """``count`` flat grey images, darkest first."""
    return [{"image": torch.full((3, size, size), (i + 1) / (count + 1)), "caption": f"grey {i}"} for i in range(count)]


def _plugin(**hooks) -> types.ModuleType:
    module = types.ModuleType("throwaway")
    for name, fn in hooks.items():
        setattr(module, name, ccm_sdk.hookimpl(fn))
    return module


@contextlib.contextmanager
def registered(module: types.ModuleType, name: str):
    plugins.load_plugins()
    plugins.pm.register(module, name=name)
    try:
        yield module
    finally:
        plugins.pm.unregister(name=name)
        plugins._failures.pop(name, None)


@pytest.fixture()
def toy_plugin():
    calls: list[dict] = []

    def dataset(**options):
        calls.append(options)
        return grey_levels(**options)

    plugin = _plugin(
        register_trainers=lambda register: register(ToyTrainer),
        register_datasets=lambda register: register(dataset, name="test-greys"),
    )
    with registered(plugin, "toy-plugin"):
        yield calls


def _toy_config(tmp_path: Path, **data) -> Path:
    raw = {
        "trainer": "test-toy",
        "output_dir": str(tmp_path / "out"),
        "data": data,
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "device": "cpu", "num_threads": 1},
        "checkpoint": {"every": 2},
        "log": {"progress": False, "plot": False},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_builtin_trainers_register_through_the_hook_with_their_configs():
    builtin = [e for e in trainers.entries() if e.plugin == "ccm_sdk.builtin.trainers"]
    assert [e.name for e in builtin] == BUILTIN
    for entry in builtin:
        assert entry.obj.name == entry.name and entry.obj.description
        # each trainer's config sits in the trainer's own module
        assert entry.obj.config_class.__module__ == entry.obj.__module__
        assert get_trainer(entry.name) is entry.obj and config_class(entry.name) is entry.obj.config_class
    with pytest.raises(UnknownNameError, match="unknown trainer 'gan'; available: adapter, ct_controlnet"):
        get_trainer("gan")


def test_a_trainer_rejects_a_config_for_another_trainer():
    lcd = load_config("lcd", None, [("output_dir", "o"), ("model", "m")])
    assert lcd.trainer == "lcd"
    with pytest.raises(InputError, match="the config is for trainer 'lcd', not 'test-toy'"):
        # a ToyConfig carrying another trainer's name
        ToyTrainer(ToyConfig(trainer="lcd", output_dir="o"))


def test_a_plugin_trainer_is_listed_by_ccm_train_help(toy_plugin, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "  test-toy       a linear regression on mean colours (a test plugin)  [toy-plugin]" in capsys.readouterr().out
    assert main(["train", "test-toy", "--help"]) == 0
    text = capsys.readouterr().out
    assert "test-toy: a linear regression on mean colours" in text
    assert "scale = 1.0" in text and "data.dataset.name = (required)" in text


def test_ccm_train_runs_a_plugin_trainer_on_a_registered_dataset(toy_plugin, tmp_path, capsys):
    config_file = _toy_config(tmp_path, dataset={"name": "test-greys", "options": {"count": 6}})
    assert main(["train", "test-toy", "--config", str(config_file), "scale=2.0"]) == 0
    out = tmp_path / "out"
    assert f"toy: {out / 'toy.pt'}" in capsys.readouterr().out
    assert toy_plugin == [{"count": 6}]  # the registered factory, called with the config's options
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["trainer"] == "test-toy" and summary["steps"] == 3
    weights = torch.load(out / "toy.pt")
    assert set(weights) == {"weight", "bias"}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["trainer"] == "test-toy" and saved["scale"] == 2.0
    assert saved["data"]["dataset"] == {"name": "test-greys", "options": {"count": 6}}
    # the trainer comes from the file's trainer key, in Python as on the command line
    result = train(load_config(None, config_file, [("output_dir", str(tmp_path / "again")), ("max_steps", 1)]))
    assert result.step == 1 and result.outputs["toy"].is_file()


def test_a_plugin_trainer_without_data_says_where_data_comes_from(toy_plugin, tmp_path):
    with pytest.raises(ccm_sdk.errors.TrainingError, match=r"set data.path .* or data.dataset \(a registered dataset\)"):
        train(load_config(None, _toy_config(tmp_path)))


def test_data_dataset_is_validated_against_the_registry(toy_plugin, tmp_path):
    with pytest.raises(InputError, match=r"data.dataset.name: .*unknown dataset 'nope'; available: .*test-greys"):
        load_config(None, _toy_config(tmp_path, dataset={"name": "nope"}))
    with pytest.raises(InputError, match="set data.path .* or data.dataset .*, not both"):
        load_config(None, _toy_config(tmp_path, path=str(tmp_path), dataset={"name": "test-greys"}))
    with pytest.raises(InputError, match="unknown key 'data.dataset.option'"):
        load_config(None, _toy_config(tmp_path, dataset={"name": "test-greys", "option": {}}))


class Misnamed(ToyTrainer):
    name = "test-misnamed"


class NoTrainConfig(ToyTrainer):
    name = "test-no-config"
    config_class = dict


@pytest.mark.parametrize(
    ("register_call", "message"),
    [
        (lambda register: register(Misnamed, name="test-alias"), "Misnamed.name is 'test-misnamed'"),
        (lambda register: register(NoTrainConfig), "config_class to be a subclass of TrainConfig"),
        (lambda register: register(torch.nn.Linear, name="linear"), "expected a subclass of Trainer"),
    ],
    ids=["name-mismatch", "config-not-a-TrainConfig", "not-a-trainer"],
)
def test_a_wrongly_registered_trainer_is_reported_and_skipped(register_call, message, monkeypatch):
    with registered(_plugin(register_trainers=register_call), "bad-trainers"):
        with pytest.warns(UserWarning, match="bad-trainers"):
            names = trainers.names()
        assert names == BUILTIN  # the built-ins survive
        assert any(f.plugin == "bad-trainers" and message in f.error for f in plugins.plugin_failures())
        monkeypatch.setenv("CCM_STRICT_PLUGINS", "1")
        plugins.pm.unregister(name="bad-trainers")  # registering anew makes the registry collect again
        plugins.pm.register(_plugin(register_trainers=register_call), name="bad-trainers")
        with pytest.raises(PluginError, match=message):
            trainers.names()
