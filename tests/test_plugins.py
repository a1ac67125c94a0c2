"""The plugin manager and registries: built-ins, isolation of broken plugins, strict mode, names."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import ccm_sdk
from ccm_sdk import hookspecs, plugins
from ccm_sdk.errors import DuplicateNameError, PluginError, UnknownNameError
from ccm_sdk.interfaces import Condition
from ccm_sdk.registry import conditions, controlnets, samplers


class InvertCondition(Condition):
    name = "test-invert"
    description = "1 - image"

    def preprocess(self, images, **kwargs):
        return 1 - images


def _plugin(**hooks):
    module = types.ModuleType("throwaway")
    for name, fn in hooks.items():
        setattr(module, name, ccm_sdk.hookimpl(fn))
    return module


class registered:
    """Register a throw-away plugin for the duration of a with-block."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __enter__(self):
        plugins.load_plugins()
        plugins.pm.register(self.module, name=self.name)
        return self.module

    def __exit__(self, *exc):
        plugins.pm.unregister(name=self.name)
        plugins._failures.pop(self.name, None)


def test_builtins_register_through_the_hooks():
    assert {"consistency", "ddim", "scheduler"} <= set(samplers.names())
    assert {"diffusers", "from-unet"} <= set(controlnets.names())
    assert samplers.entry("consistency").plugin == "ccm_sdk.builtin.samplers"


def test_a_throwaway_plugin_registers_and_unregisters():
    with registered(_plugin(register_conditions=lambda register: register(InvertCondition)), "invert-plugin"):
        condition = ccm_sdk.get_condition("test-invert")
        assert torch.equal(condition(torch.zeros(1, 3, 4, 4)), torch.ones(1, 3, 4, 4))
        assert conditions.entry("test-invert").plugin == "invert-plugin"
    assert "test-invert" not in conditions


def test_a_plugin_whose_hook_raises_is_reported_and_skipped():
    def boom(register):
        register(InvertCondition)
        raise RuntimeError("kaput")

    with registered(_plugin(register_conditions=boom), "broken-plugin"):
        with pytest.warns(UserWarning, match="broken-plugin"):
            names = conditions.names()
        assert "test-invert" not in names  # nothing from the broken plugin survives
        assert any(f.plugin == "broken-plugin" and "kaput" in f.error for f in plugins.plugin_failures())


def test_strict_mode_reraises(monkeypatch):
    monkeypatch.setenv("CCM_STRICT_PLUGINS", "1")
    with registered(_plugin(register_conditions=lambda register: register(object, name="obj")), "invalid-plugin"):
        with pytest.raises(PluginError, match="expected a subclass of Condition"):
            conditions.names()


def test_registering_something_invalid_is_reported():
    with registered(_plugin(register_samplers=lambda register: register(len, name="len")), "bad-sampler"):
        with pytest.warns(UserWarning, match="expected a subclass of Sampler"):
            assert "len" not in samplers.names()


def test_duplicate_names_name_both_plugins(monkeypatch):
    class FakeConsistency(InvertCondition):
        name = "canny"

    with registered(_plugin(register_conditions=lambda register: register(FakeConsistency)), "copycat"):
        with pytest.warns(UserWarning, match="registered by both plugin 'ccm_sdk.builtin.conditions' and plugin 'copycat'"):
            assert conditions.entry("canny").plugin == "ccm_sdk.builtin.conditions"
        monkeypatch.setenv("CCM_STRICT_PLUGINS", "1")
        conditions._snapshot = None
        with pytest.raises(PluginError, match="copycat") as info:
            conditions.names()
        assert isinstance(info.value.__cause__, DuplicateNameError)


def test_unknown_names_list_what_is_available():
    with pytest.raises(UnknownNameError) as info:
        ccm_sdk.get_condition("no-such-condition")
    assert "unknown condition 'no-such-condition'; available:" in str(info.value)
    assert "canny" in str(info.value)
    assert isinstance(info.value, LookupError)


def test_misspelled_hook_names_are_rejected():
    module = types.ModuleType("typo")
    module.register_conditionz = ccm_sdk.hookimpl(lambda register: None)
    plugins.load_plugins()
    with pytest.warns(UserWarning, match="typo-plugin"):
        plugins._register_checked(module, "typo-plugin")
    assert plugins.pm.get_plugin("typo-plugin") is None
    plugins._failures.pop("typo-plugin", None)


class _FakeEntryPoint:
    def __init__(self, name, loader):
        self.name, self._loader, self.dist = name, loader, None

    def load(self):
        return self._loader()


def _fresh_load(monkeypatch, eps):
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps)
    monkeypatch.setattr(plugins, "_loaded", False)
    names_before = {n for n, _ in plugins.pm.list_name_plugin()}
    plugins.load_plugins()
    return {n for n, _ in plugins.pm.list_name_plugin()} - names_before


def test_entry_point_that_fails_to_import_is_skipped(monkeypatch):
    def fail():
        raise ImportError("no module named 'missing_dep'")

    good = _plugin(register_conditions=lambda register: register(InvertCondition))
    eps = [_FakeEntryPoint("broken-ep", fail), _FakeEntryPoint("good-ep", lambda: good)]
    try:
        with pytest.warns(UserWarning, match="broken-ep"):
            added = _fresh_load(monkeypatch, eps)
        assert added == {"good-ep"}
        assert "test-invert" in conditions.names()
        assert any(f.plugin == "broken-ep" and f.kind == "import-error" for f in plugins.plugin_failures())
    finally:
        plugins.pm.unregister(name="good-ep")
        plugins._failures.pop("broken-ep", None)


def test_entry_point_failure_in_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("CCM_STRICT_PLUGINS", "1")

    def fail():
        raise ImportError("boom")

    try:
        with pytest.raises(PluginError, match="broken-ep"):
            _fresh_load(monkeypatch, [_FakeEntryPoint("broken-ep", fail)])
    finally:
        plugins._failures.pop("broken-ep", None)


def test_allow_list_restricts_entry_points(monkeypatch):
    a = _plugin(register_conditions=lambda register: None)
    b = _plugin(register_conditions=lambda register: None)
    monkeypatch.setenv("CCM_PLUGINS", "ep-a")
    try:
        added = _fresh_load(monkeypatch, [_FakeEntryPoint("ep-a", lambda: a), _FakeEntryPoint("ep-b", lambda: b)])
        assert added == {"ep-a"}
    finally:
        for name in ("ep-a", "ep-b"):
            if plugins.pm.get_plugin(name) is not None:
                plugins.pm.unregister(name=name)


def test_every_hook_is_documented():
    doc = (Path(__file__).parents[1] / "docs" / "plugin-hooks.md").read_text()
    documented = set(re.findall(r"^## (register_\w+)", doc, flags=re.M))
    hooks = {name for name in dir(hookspecs) if name.startswith("register_")}
    assert hooks == documented


def test_plugin_infos_list_builtins_with_versions():
    infos = {i.name: i for i in plugins.plugin_infos()}
    assert infos["ccm_sdk.builtin.samplers"].version == ccm_sdk.__version__
    assert infos["ccm_sdk.builtin.samplers"].hooks == ("register_samplers",)


def test_import_works_without_triton_or_cuda():
    import subprocess
    import sys

    code = "import sys; sys.modules['triton'] = None\nimport ccm_sdk, ccm_kernels\nfrom ccm_sdk.pipeline import CCMPipeline\nprint(ccm_sdk.get_sampler('consistency').name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "consistency"


def test_model_sources_resolve_name_colon_argument(lcm_dir, controlnet_dir):
    from ccm_sdk.pipeline import CCMPipeline

    folders = {"lcm": lcm_dir, "canny": controlnet_dir}
    plugin = _plugin(register_models=lambda register: register(lambda arg: folders[arg], name="zoo"))
    with registered(plugin, "zoo-plugin"):
        pipe = CCMPipeline.from_pretrained("zoo:lcm", controlnet="zoo:canny")
        assert len(pipe.controlnets) == 1
    with pytest.raises(Exception, match="does not exist"):
        CCMPipeline.from_pretrained("zoo:lcm")  # no plugin, no folder of that name


def test_datasets_register_and_build_with_options():
    from ccm_sdk.registry import get_dataset

    plugin = _plugin(register_datasets=lambda register: register(lambda n=2: list(range(n)), name="numbers"))
    with registered(plugin, "numbers-plugin"):
        assert get_dataset("numbers", n=3) == [0, 1, 2]
    with pytest.raises(UnknownNameError, match="unknown dataset 'numbers'"):
        get_dataset("numbers")


def test_a_new_plugin_is_seen_even_where_a_removed_one_was():
    # the registry notices plugins by object, so a new module that happens to reuse a freed
    # module's id (CPython reuses addresses) is still collected
    class Gone(InvertCondition):
        name = "test-gone"

    class Fresh(InvertCondition):
        name = "test-fresh"

    with registered(_plugin(register_conditions=lambda register: register(Gone)), "first"):
        assert "test-gone" in conditions.names()
    second = _plugin(register_conditions=lambda register: register(Fresh))
    plugins.pm.register(second, name="second")
    try:
        names = conditions.names()
        assert "test-fresh" in names and "test-gone" not in names
    finally:
        plugins.pm.unregister(second)
