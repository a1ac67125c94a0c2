"""Name -> extension registries, filled from the plugin hooks on first use.

Each plugin's hook runs on its own, so one that raises or registers something invalid is
reported and skipped without losing the others. Registries refresh themselves when plugins
are added or removed (tests register throw-away plugins with ``pm.register``).
"""

from __future__ import annotations

import sys

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from . import plugins
from .errors import DuplicateNameError, PluginError, UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    plugin: str


class Registry(Generic[T]):
    """Everything registered through one hook, by name."""

    def __init__(self, kind: str, hook_name: str, validate: Callable[[Any, str], None]):
        self.kind, self.hook_name, self._validate = kind, hook_name, validate
        self._entries: dict[str, Entry[T]] = {}
        self._snapshot: frozenset[object] | None = None
        plugins.add_collector(self._ensure)

    def _collect(self) -> None:
        plugins.clear_failures(self.hook_name)
        entries: dict[str, Entry[T]] = {}
        hook = getattr(plugins.pm.hook, self.hook_name)
        # the documented rule for a name two plugins register: the one first in plugins.precedence keeps it
        for impl in sorted(hook.get_hookimpls(), key=lambda impl: plugins.precedence(impl.plugin_name)):
            staged: list[Entry[T]] = []
            invalid: list[Exception] = []

            def register(obj, name: str | None = None, _staged=staged, _invalid=invalid, _plugin=impl.plugin_name):
                name = name if name is not None else getattr(obj, "name", None)
                try:
                    if not isinstance(name, str) or not name:
                        raise PluginError(f"{self.kind} {obj!r} has no name; pass register(obj, name=...)")
                    self._validate(obj, name)
                except Exception as exc:
                    _invalid.append(exc)
                    raise
                _staged.append(Entry(name, obj, _plugin))

            plugin = impl.plugin_name
            try:
                impl.function(register=register)
            except Exception as exc:
                raised = any(exc is e for e in invalid)
                self._report(plugin, plugins.INVALID_REGISTRATION if raised else plugins.HOOK_RAISED, exc)
                continue
            if invalid:  # the hook caught what register() raised: the registration is still invalid
                self._report(plugin, plugins.INVALID_REGISTRATION, invalid[0])
                continue
            names = [entry.name for entry in staged]
            twice = next((name for name in names if names.count(name) > 1), None)
            if twice is not None:
                self._report(plugin, plugins.INVALID_REGISTRATION,
                             DuplicateNameError(f"plugin {plugin!r} registers {self.kind} {twice!r} twice"))
                continue
            clash = next((entry for entry in staged if entry.name in entries), None)
            if clash is not None:
                keeper = entries[clash.name].plugin
                self._report(plugin, plugins.NAME_COLLISION, DuplicateNameError(
                    f"{self.kind} {clash.name!r} is registered by both plugin {keeper!r} and plugin {plugin!r}: "
                    f"{plugins.describe_plugin(keeper)} keeps it and {plugins.describe_plugin(plugin)} is skipped "
                    f"({plugins.PRECEDENCE_RULE})"), collides_with=keeper)
                continue
            entries.update((e.name, e) for e in staged)
        self._entries = entries

    def _report(self, plugin: str, kind: str, exc: Exception, *, collides_with: str | None = None) -> None:
        plugins.report_failure(plugin, kind, exc, hook=self.hook_name, collides_with=collides_with)

    def _ensure(self) -> None:
        plugins.load_plugins()
        # the plugin objects themselves, not their ids: a freed plugin's id can be reused by a new one
        snapshot = frozenset(plugins.pm.get_plugins())
        if snapshot != self._snapshot:
            self._collect()
            self._snapshot = snapshot

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        self._ensure()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        self._ensure()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        self._ensure()
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: object) -> bool:
        self._ensure()
        return name in self._entries


# --- the SDK's registries --------------------------------------------------------------


def _subclass_of(base: type) -> Callable[[Any, str], None]:
    def validate(obj: Any, name: str) -> None:
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise PluginError(f"{name!r}: expected a subclass of {base.__name__}, got {obj!r}")

    return validate


def _callable(obj: Any, name: str) -> None:
    if not callable(obj):
        raise PluginError(f"{name!r}: expected a callable provider, got {obj!r}")


def _trainer_class(obj: Any, name: str) -> None:
    # A Trainer subclass exists only once ccm_sdk.training.core is loaded, so its bases are looked up
    # there instead of imported: the training stack imports this registry, not the other way round.
    core, config_module = sys.modules.get("ccm_sdk.training.core"), sys.modules.get("ccm_sdk.training.config")
    if core is None or config_module is None:
        raise PluginError(f"{name!r}: expected a subclass of Trainer (ccm_sdk.training.core), got {obj!r}")
    Trainer, TrainConfig = core.Trainer, config_module.TrainConfig
    _subclass_of(Trainer)(obj, name)
    if getattr(obj, "name", None) != name:
        raise PluginError(f"trainer {name!r}: {obj.__name__}.name is {getattr(obj, 'name', None)!r}; register(cls) uses cls.name")
    config = getattr(obj, "config_class", None)
    if not (isinstance(config, type) and issubclass(config, TrainConfig)):
        raise PluginError(f"trainer {name!r}: expected {obj.__name__}.config_class to be a subclass of TrainConfig, got {config!r}")


def _registries():
    from .interfaces import Adapter, Condition, Sampler

    return (
        Registry("condition", "register_conditions", _subclass_of(Condition)),
        Registry("ControlNet provider", "register_controlnets", _callable),
        Registry("adapter", "register_adapters", _subclass_of(Adapter)),
        Registry("sampler", "register_samplers", _subclass_of(Sampler)),
        Registry("dataset", "register_datasets", _callable),
        Registry("model source", "register_models", _callable),
        Registry("trainer", "register_trainers", _trainer_class),
        Registry("feature extractor", "register_feature_extractors", _callable),
    )


conditions, controlnets, adapters, samplers, datasets, models, trainers, feature_extractors = _registries()


def get_condition(name: str, **options: Any):
    """Instantiate the condition registered as ``name`` with ``options``; its ``origin`` names its plugin."""
    entry = conditions.entry(name)
    condition = entry.obj(**options)
    condition.origin = plugins.describe_plugin(entry.plugin)
    return condition


def get_sampler(name: str, **options: Any):
    """Instantiate the sampler registered as ``name`` with ``options``."""
    return samplers.get(name)(**options)


def get_dataset(name: str, **options: Any):
    """Build the dataset registered as ``name`` with ``options``."""
    return datasets.get(name)(**options)
