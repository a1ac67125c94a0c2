"""Every failure kind docs/plugin-hooks.md promises, with fake plugins and fake distributions: each is
recorded as a PluginFailure, listed by ``ccm plugins`` and ``ccm plugins --json``, and a name two
third-party plugins claim goes by the documented rule, with both named."""

from __future__ import annotations

import json
import types
import warnings

import pytest

import ccm_sdk
from ccm_sdk import plugins
from ccm_sdk.cli import main
from ccm_sdk.errors import PluginError
from ccm_sdk.interfaces import Condition
from ccm_sdk.registry import conditions

pytestmark = pytest.mark.filterwarnings("ignore:ccm_sdk. skipping plugin:UserWarning")

FAILURE_FIELDS = {"plugin", "kind", "error", "distribution", "hook", "collides_with", "collides_with_distribution"}


def _condition(name):
    return type(f"Condition_{name}", (Condition,), {"name": name, "preprocess": lambda self, images, **kw: images})


def _plugin(**hooks):
    module = types.ModuleType("fake_plugin")
    for name, fn in hooks.items():
        setattr(module, name, ccm_sdk.hookimpl(fn))
    return module


class _FakeDist:
    def __init__(self, name, version="1.2"):
        self.metadata, self.version = {"Name": name}, version


class _FakeEntryPoint:
    def __init__(self, name, module, dist=None):
        self.name, self._module, self.dist = name, module, None if dist is None else _FakeDist(dist)

    def load(self):
        if isinstance(self._module, Exception):
            raise self._module
        return self._module


@pytest.fixture()
def load(monkeypatch):
    """``load(entry_points)``: load_plugins() again over fake entry points; removes what they added afterwards."""
    before = {name for name, _ in plugins.pm.list_name_plugin()}
    touched: set[str] = set()

    def run(eps):
        touched.update(ep.name for ep in eps)
        monkeypatch.setattr(plugins, "entry_points", lambda group: list(eps))
        monkeypatch.setattr(plugins, "_loaded", False)
        plugins.load_plugins()

    yield run
    for name, _ in plugins.pm.list_name_plugin():
        if name not in before:
            plugins.pm.unregister(name=name)
    for name in touched:
        for table in (plugins._failures, plugins._versions, plugins._distributions):
            table.pop(name, None)
    plugins.plugin_failures()  # collect again without the fakes: their hook failures go


def _failures(plugin):
    return [f for f in plugins.plugin_failures() if f.plugin == plugin]


def test_import_error_names_the_distribution(load):
    load([_FakeEntryPoint("needs-missing", ImportError("no module named 'missing_dep'"), dist="ccm-needs-missing")])
    (failure,) = _failures("needs-missing")
    assert (failure.kind, failure.distribution, failure.hook) == ("import-error", "ccm-needs-missing", None)
    assert failure.error == "ImportError: no module named 'missing_dep'"


@pytest.mark.parametrize("hooks, message", [
    ({"register_conditionz": lambda register: None}, "unknown hook 'register_conditionz'"),
    ({"register_conditions": lambda reg: None}, "hook 'register_conditions'"),  # an argument the hook does not pass
])  # fmt: skip
def test_unknown_hooks_and_wrong_arguments_are_refused(load, hooks, message):
    load([_FakeEntryPoint("typo", _plugin(**hooks), dist="ccm-typo")])
    (failure,) = _failures("typo")
    assert failure.kind == "unknown-hook" and message in failure.error
    assert plugins.pm.get_plugin("typo") is None
    assert "canny" in conditions.names()  # the rest keeps working


def test_a_hook_that_raises_is_listed_without_any_registry_used_first(load):
    def boom(register):
        register(_condition("test-boom"))
        raise RuntimeError("kaput")

    load([_FakeEntryPoint("boom", _plugin(register_conditions=boom), dist="ccm-boom")])
    (failure,) = _failures("boom")  # plugin_failures() collects every registry itself
    assert (failure.kind, failure.hook, failure.distribution) == ("hook-raised", "register_conditions", "ccm-boom")
    assert failure.error == "RuntimeError: kaput"
    assert "test-boom" not in conditions.names()


@pytest.mark.parametrize("hook, message", [
    (lambda register: register(object, name="obj"), "expected a subclass of Condition"),
    (lambda register: register(_condition("")), "has no name"),
    (lambda register: [register(_condition("test-twice")), register(_condition("test-twice"))], "registers condition 'test-twice' twice"),
])  # fmt: skip
def test_invalid_registrations(load, hook, message):
    load([_FakeEntryPoint("invalid", _plugin(register_conditions=hook), dist="ccm-invalid")])
    (failure,) = _failures("invalid")
    assert failure.kind == "invalid-registration" and message in failure.error
    assert "test-twice" not in conditions.names()


def test_an_invalid_registration_the_hook_swallows_is_still_reported(load):
    def sly(register):
        register(_condition("test-fine"))
        try:
            register(len, name="len")
        except PluginError:
            pass

    load([_FakeEntryPoint("sly", _plugin(register_conditions=sly), dist="ccm-sly")])
    (failure,) = _failures("sly")
    assert failure.kind == "invalid-registration" and "expected a subclass of Condition" in failure.error
    assert "test-fine" not in conditions.names()  # a plugin is skipped whole for a hook, as when it raises


def _two_claimants():
    zeta = _FakeEntryPoint("zeta", _plugin(register_conditions=lambda register: register(_condition("test-shared"))), dist="Zeta_Conditions")
    alpha = _FakeEntryPoint("alpha", _plugin(register_conditions=lambda register: register(_condition("test-shared"))), dist="alpha-conditions")
    return zeta, alpha


@pytest.mark.parametrize("order", ["zeta first", "alpha first"])
def test_two_distributions_claiming_a_name_the_first_by_distribution_name_wins(load, order):
    zeta, alpha = _two_claimants()
    load([zeta, alpha] if order == "zeta first" else [alpha, zeta])
    assert conditions.entry("test-shared").plugin == "alpha"  # whatever order the entry points came in
    (failure,) = _failures("zeta")
    assert failure.kind == "name-collision" and failure.hook == "register_conditions"
    assert (failure.distribution, failure.collides_with, failure.collides_with_distribution) == (
        "Zeta_Conditions", "alpha", "alpha-conditions")
    assert "plugin 'alpha' of distribution 'alpha-conditions' 1.2 keeps it" in failure.error
    assert "plugin 'zeta' of distribution 'Zeta_Conditions' 1.2 is skipped" in failure.error
    assert not _failures("alpha")


def test_builtins_keep_their_names_over_any_distribution(load):
    load([_FakeEntryPoint("aaa", _plugin(register_conditions=lambda register: register(_condition("canny"))), dist="aaa")])
    assert conditions.entry("canny").plugin == "ccm_sdk.builtin.conditions"
    (failure,) = _failures("aaa")
    assert failure.kind == "name-collision" and failure.collides_with == "ccm_sdk.builtin.conditions"
    assert "built-in plugin 'ccm_sdk.builtin.conditions' keeps it" in failure.error


def test_two_distributions_declaring_one_entry_point_name(load):
    first = _plugin(register_conditions=lambda register: register(_condition("test-from-b")))
    second = _plugin(register_conditions=lambda register: register(_condition("test-from-a")))
    load([_FakeEntryPoint("same", first, dist="dist-b"), _FakeEntryPoint("same", second, dist="dist-a")])
    assert plugins.pm.get_plugin("same") is second  # dist-a sorts first
    assert "test-from-a" in conditions.names() and "test-from-b" not in conditions.names()
    (failure,) = _failures("same")
    assert (failure.kind, failure.distribution, failure.collides_with_distribution) == ("name-collision", "dist-b", "dist-a")
    assert "declared by distribution 'dist-b' and by plugin 'same' of distribution 'dist-a'" in failure.error


def test_strict_mode_raises_on_a_collision(load, monkeypatch):
    load(list(_two_claimants()))
    monkeypatch.setenv("CCM_STRICT_PLUGINS", "1")
    conditions._snapshot = None
    with pytest.raises(PluginError, match=r"plugin 'zeta' failed \(name-collision in register_conditions\)"):
        conditions.names()


def test_failures_go_when_their_plugin_does(load):
    load([_FakeEntryPoint("boom", _plugin(register_conditions=lambda register: 1 / 0), dist="ccm-boom")])
    assert _failures("boom")
    plugins.pm.unregister(name="boom")
    assert not _failures("boom")


def test_ccm_plugins_lists_every_kind(load, capsys):
    def boom(register):
        raise RuntimeError("kaput")

    zeta, alpha = _two_claimants()
    load([
        _FakeEntryPoint("broken", ImportError("missing_dep"), dist="ccm-broken"),
        _FakeEntryPoint("typo", _plugin(register_conditionz=lambda register: None), dist="ccm-typo"),
        _FakeEntryPoint("boom", _plugin(register_samplers=boom), dist="ccm-boom"),
        _FakeEntryPoint("invalid", _plugin(register_conditions=lambda register: register(object, name="obj")), dist="ccm-invalid"),
        zeta, alpha,
    ])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    failed = {f["plugin"]: f for f in listing["failed"]}
    assert all(set(f) == FAILURE_FIELDS for f in listing["failed"])
    assert {failed[p]["kind"] for p in ("broken", "typo", "boom", "invalid", "zeta")} == set(plugins.FAILURE_KINDS)
    assert failed["zeta"]["collides_with"] == "alpha" and failed["zeta"]["collides_with_distribution"] == "alpha-conditions"
    assert failed["boom"]["hook"] == "register_samplers"
    loaded = {p["name"]: p for p in listing["plugins"]}
    assert set(loaded["alpha"]) == {"name", "version", "hooks", "distribution"}
    assert loaded["alpha"]["distribution"] == "alpha-conditions" and loaded["alpha"]["version"] == "1.2"

    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for plugin, where in [("broken", "import-error"), ("typo", "unknown-hook"), ("boom", "hook-raised in register_samplers"),
                          ("invalid", "invalid-registration in register_conditions"),
                          ("zeta", "name-collision in register_conditions")]:
        assert any(line.startswith(plugin) and f"FAILED ({where}): " in line for line in lines), (plugin, lines)
