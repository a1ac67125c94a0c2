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

    def _collect(self) -> None:
        entries: dict[str, Entry[T]] = {}
        hook = getattr(plugins.pm.hook, self.hook_name)
        # get_hookimpls lists in registration order: built-ins first, so they keep their names.
        for impl in hook.get_hookimpls():
            staged: list[Entry[T]] = []

            def register(obj, name: str | None = None, _staged=staged, _plugin=impl.plugin_name):
                name = name if name is not None else getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"{self.kind} {obj!r} has no name; pass register(obj, name=...)")
                self._validate(obj, name)
                _staged.append(Entry(name, obj, _plugin))

            try:
                impl.function(register=register)
                for entry in staged:
                    if entry.name in entries:
                        first = entries[entry.name].plugin
                        raise DuplicateNameError(
                            f"{self.kind} {entry.name!r} is registered by both plugin {first!r} "
                            f"and plugin {entry.plugin!r}"
                        )
                    if sum(e.name == entry.name for e in staged) > 1:
                        raise DuplicateNameError(
                            f"plugin {entry.plugin!r} registers {self.kind} {entry.name!r} twice"
                        )
            except Exception as exc:
                plugins.report_failure(impl.plugin_name, f"register ({self.kind})", exc)
                continue
            entries.update((e.name, e) for e in staged)
        self._entries = entries

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
    """Instantiate the condition registered as ``name`` with ``options``."""
    return conditions.get(name)(**options)


def get_sampler(name: str, **options: Any):
    """Instantiate the sampler registered as ``name`` with ``options``."""
    return samplers.get(name)(**options)


def get_dataset(name: str, **options: Any):
    """Build the dataset registered as ``name`` with ``options``."""
    return datasets.get(name)(**options)
