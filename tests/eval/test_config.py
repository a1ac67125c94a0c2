"""Eval configs: the shipped ones validate, presets expand, and bad configs raise typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccm_sdk.errors import InputError, MissingModelError, UnknownNameError
from ccm_sdk.eval.config import PRESETS, TABLE2_PRESETS, check_names, expand_methods, load_eval_config

CONFIG_DIR = Path(__file__).parents[2] / "configs" / "eval"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def _config(**changes):
    raw = {
        "dataset": {"path": "data"},
        "conditions": [{"name": "canny"}, {"name": "sr", "options": {"factor": 4}, "label": "sr4x"}],
        "methods": list(TABLE2_PRESETS),
        "paper": {"dm": "dm", "cm": "cm", "adapter": "ad",
                  "dm_controlnets": {"canny": "a", "sr4x": "b"}, "cm_controlnets": {"canny": "c", "sr4x": "d"}},
    }  # fmt: skip
    raw.update(changes)
    return raw


def test_there_are_shipped_configs():
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    config = load_eval_config(path)
    methods = expand_methods(config)
    check_names(config, methods)
    assert methods


def test_table2_presets_expand_to_the_paper_rows():
    methods = expand_methods(load_eval_config(_config()))
    assert [m.name for m in methods] == [PRESETS[p][0] for p in TABLE2_PRESETS]
    dm, cm, adapted, ct = methods
    assert (dm.model, dm.sampler, dm.steps, dm.guidance_scale) == ("dm", "ddim", [50], 7.5)
    assert (cm.model, cm.sampler, cm.steps, cm.controlnets["canny"]) == ("cm", "consistency", [4, 1], "a")
    assert adapted.adapter == "ad" and cm.adapter is None
    assert ct.controlnets == {"canny": "c", "sr4x": "d"}


def test_uncontrolled_presets_need_no_controlnets():
    config = load_eval_config(_config(methods=["cm", "dm"], paper={"dm": "dm", "cm": "cm"}))
    cm, dm = expand_methods(config)
    assert (cm.name, cm.uncontrolled, cm.controlnets, cm.sampler, cm.steps) == ("CM, no control", True, {}, "consistency", [4, 1])
    assert (dm.name, dm.uncontrolled, dm.sampler, dm.steps) == ("DM, no control", True, "ddim", [50])
    bad = {"name": "x", "model": "m", "uncontrolled": True, "controlnets": {"canny": "a"}}
    with pytest.raises(InputError, match="'x' is uncontrolled: it takes no controlnets"):
        load_eval_config(_config(methods=[bad]))


def test_full_method_entries_and_filtering():
    method = {"name": "mine", "model": "m", "controlnets": {"canny": "x", "sr4x": "y"}, "steps": [2]}
    config = load_eval_config(_config(methods=["cm-controlnet+cm", method]))
    assert [m.name for m in expand_methods(config, ["mine"])] == ["mine"]
    assert [m.name for m in expand_methods(config, ["cm-controlnet+cm"])] == ["CM's ControlNet + CM"]


def test_unknown_method_preset_raises():
    with pytest.raises(UnknownNameError, match="unknown eval method preset 'cm-controlnet\\+gan'"):
        expand_methods(load_eval_config(_config(methods=["cm-controlnet+gan"])))


def test_unknown_method_filter_raises():
    with pytest.raises(UnknownNameError, match="unknown eval method 'nope'"):
        expand_methods(load_eval_config(_config()), ["nope"])


def test_unknown_condition_name_raises():
    config = load_eval_config(_config(conditions=[{"name": "cany"}], paper={"cm": "cm", "cm_controlnets": {"cany": "c"}},
                                      methods=["cm-controlnet+cm"]))  # fmt: skip
    with pytest.raises(UnknownNameError, match="unknown condition 'cany'"):
        check_names(config, expand_methods(config))


def test_unknown_feature_kind_is_a_config_error_listing_the_registered_ones():
    with pytest.raises(InputError, match=r"features.kind: .*unknown feature extractor 'fid'; available: feature-net, inception, pixels"):
        load_eval_config(_config(features={"kind": "fid"}))
    assert load_eval_config(_config(features={"kind": "feature-net", "path": "net"})).features.kind == "feature-net"


def test_unknown_sampler_raises():
    method = {"name": "m", "model": "m", "controlnets": {"canny": "x", "sr4x": "y"}, "sampler": "euler-magic"}
    config = load_eval_config(_config(methods=[method]))
    with pytest.raises(UnknownNameError, match="unknown sampler 'euler-magic'"):
        check_names(config, expand_methods(config))


def test_method_without_a_controlnet_for_a_condition_raises():
    config = load_eval_config(_config(paper={"cm": "cm", "cm_controlnets": {"canny": "c"}}, methods=["cm-controlnet+cm"]))
    with pytest.raises(InputError, match=r"no ControlNet for condition\(s\) \['sr4x'\]"):
        expand_methods(config)


def test_preset_needs_its_models():
    with pytest.raises(InputError, match="paper.adapter"):
        expand_methods(load_eval_config(_config(paper={"cm": "cm", "dm_controlnets": {"canny": "a", "sr4x": "b"}},
                                                methods=["dm-controlnet+cm+adapter"])))  # fmt: skip
    with pytest.raises(InputError, match="'paper' section"):
        expand_methods(load_eval_config(_config(paper=None)))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"unknown_key": 1}, "unknown_key"),
        ({"num_samples": 1}, "num_samples"),
        ({"dataset": {"path": "a", "factory": "m:f"}}, "exactly one of dataset.name, dataset.path"),
        ({"conditions": [{"name": "canny"}, {"name": "canny"}]}, "labels must be unique"),
        ({"conditions": []}, "conditions"),
        ({"conditions": [{"name": "mask", "line_f1": {}}]}, "line_f1 compares line maps"),
        ({"conditions": [{"name": "canny", "line_f1": {"tolerance": -1}}]}, "tolerance"),
        ({"seed": -1}, r"seed: Input should be greater than or equal to 0"),
        ({"seed": 2**64}, r"seed: Input should be less than 4294967296"),
    ],
)
def test_invalid_configs_raise_input_errors(changes, message):
    with pytest.raises(InputError, match=message):
        load_eval_config(_config(**changes))


def test_missing_config_file_raises(tmp_path):
    with pytest.raises(MissingModelError, match="does not exist"):
        load_eval_config(tmp_path / "none.yaml")
