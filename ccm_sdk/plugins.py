"""Plugin manager: built-in plugins plus ``ccm_sdk`` entry points, loaded lazily, once.

``CCM_PLUGINS=a,b`` loads only the named entry-point plugins (empty: none);
``CCM_STRICT_PLUGINS=1`` re-raises a broken plugin's error instead of reporting and skipping it.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .errors import DuplicateNameError, PluginError
from .version import __version__

ENTRY_POINT_GROUP = "ccm_sdk"
BUILTIN_PLUGINS = (
    "ccm_sdk.builtin.samplers",
    "ccm_sdk.builtin.controlnets",
    "ccm_sdk.builtin.adapters",
    "ccm_sdk.builtin.conditions",
    "ccm_sdk.builtin.trainers",
    "ccm_sdk.builtin.feature_extractors",
)

pm = pluggy.PluginManager("ccm_sdk")
pm.add_hookspecs(hookspecs)

_lock = threading.RLock()
_loaded = False
_failures: dict[str, list[PluginFailure]] = {}  # plugin name -> what went wrong with it
_versions: dict[str, str] = {}
_distributions: dict[str, str] = {}  # entry-point plugin name -> the distribution that installed it
_collectors: list[Callable[[], None]] = []  # the registries (ccm_sdk.registry), each collects its hook

IMPORT_ERROR = "import-error"  # the entry point's module failed to import
UNKNOWN_HOOK = "unknown-hook"  # a hook implementation pluggy refused: a misspelled hook name, or arguments the hook lacks
HOOK_RAISED = "hook-raised"  # a register_* hook raised
INVALID_REGISTRATION = "invalid-registration"  # register() got something of the wrong kind, no name, or a name twice
NAME_COLLISION = "name-collision"  # a name another plugin already took (an entry-point name, or a registered name)
FAILURE_KINDS = (IMPORT_ERROR, UNKNOWN_HOOK, HOOK_RAISED, INVALID_REGISTRATION, NAME_COLLISION)
PRECEDENCE_RULE = "built-in plugins first, then plugins of installed distributions in the order of their names"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin, or one of its hooks, that was skipped; ``kind`` is one of :data:`FAILURE_KINDS`.

    ``hook``: the ``register_*`` hook that failed (None for import-error, unknown-hook and a clash of
    entry-point names). ``collides_with`` / ``collides_with_distribution``: for a name-collision, the
    plugin that keeps the name.
    """

    plugin: str
    kind: str
    error: str
    distribution: str | None = None
    hook: str | None = None
    collides_with: str | None = None
    collides_with_distribution: str | None = None


def strict_mode() -> bool:
    return os.environ.get("CCM_STRICT_PLUGINS", "").lower() in ("1", "true", "yes")


def report_failure(plugin: str, kind: str, exc: BaseException, *, hook: str | None = None,
                   distribution: str | None = None, collides_with: str | None = None) -> None:
    """Record a broken plugin, warn, and re-raise in strict mode."""
    if kind not in FAILURE_KINDS:
        raise ValueError(f"expected a failure kind in {FAILURE_KINDS}, got {kind!r}")
    failure = PluginFailure(plugin, kind, f"{type(exc).__name__}: {exc}", distribution or _distributions.get(plugin), hook,
                            collides_with, _distributions.get(collides_with) if collides_with else None)
    recorded = _failures.setdefault(plugin, [])
    if failure not in recorded:
        recorded.append(failure)
    where = f"{kind} in {hook}" if hook else kind
    if strict_mode():
        raise PluginError(f"plugin {plugin!r} failed ({where}): {failure.error}") from exc
    warnings.warn(f"ccm_sdk: skipping plugin {plugin!r} ({where}): {failure.error}", stacklevel=3)


def add_collector(collect: Callable[[], None]) -> None:
    """Have :func:`plugin_failures` call ``collect`` first: a registry that runs its hook and reports what fails."""
    _collectors.append(collect)


def clear_failures(hook: str) -> None:
    """Forget the failures recorded for ``hook`` (its registry is being collected again)."""
    for plugin, recorded in list(_failures.items()):
        kept = [f for f in recorded if f.hook != hook]
        if kept:
            _failures[plugin] = kept
        else:
            del _failures[plugin]


def _canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def precedence(plugin: str) -> tuple:
    """Sort key of the rule that settles a name two plugins register: built-ins (in their own order),
    then entry-point plugins by distribution name and entry-point name, then plugins registered at run
    time with ``pm.register`` (a stable sort keeps them in registration order)."""
    if plugin in BUILTIN_PLUGINS:
        return (0, BUILTIN_PLUGINS.index(plugin))
    if plugin in _distributions:
        return (1, _canonical(_distributions[plugin]), plugin)
    return (2,)


def describe_plugin(plugin: str, distribution: str | None = None) -> str:
    """``plugin`` for messages: built in, or the distribution (and version) that installed it."""
    if plugin in BUILTIN_PLUGINS:
        return f"built-in plugin {plugin!r}"
    distribution = distribution or _distributions.get(plugin)
    if distribution is None:
        return f"plugin {plugin!r}"
    return f"plugin {plugin!r} of distribution {distribution!r} {_versions.get(plugin, '')}".rstrip()


def _allowed() -> set[str] | None:
    raw = os.environ.get("CCM_PLUGINS")
    return None if raw is None else {n.strip() for n in raw.split(",") if n.strip()}


def _register_checked(module, name: str) -> None:
    try:
        pm.register(module, name=name)
    except pluggy.PluginValidationError as exc:  # a hook implementation with arguments its hook lacks
        report_failure(name, UNKNOWN_HOOK, exc)
        return
    except ValueError as exc:  # pluggy: this module is registered already, under another name
        report_failure(name, INVALID_REGISTRATION, exc)
        return
    try:
        pm.check_pending()  # catches misspelled hook names
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        report_failure(name, UNKNOWN_HOOK, exc)


def _distribution_name(ep) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def load_plugins() -> None:
    """Register the built-in plugins and every allowed entry point; safe to call often.

    Entry points load in the order of :func:`precedence`, so when two distributions declare the same
    entry-point name the one whose distribution name sorts first is loaded and the other is reported.
    """
    global _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        for module_name in BUILTIN_PLUGINS:
            if pm.get_plugin(module_name) is None:
                pm.register(importlib.import_module(module_name), name=module_name)
                _versions[module_name] = __version__
        allowed = _allowed()
        ordered = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (_canonical(_distribution_name(ep) or ""), ep.name))
        for ep in ordered:
            dist_name = _distribution_name(ep)
            if allowed is not None and ep.name not in allowed and dist_name not in allowed:
                continue
            if pm.get_plugin(ep.name) is not None:
                owner = _distributions.get(ep.name)
                if owner != dist_name or ep.name in BUILTIN_PLUGINS:  # not the same plugin loaded by an earlier call
                    holder = describe_plugin(ep.name)
                    report_failure(ep.name, NAME_COLLISION, DuplicateNameError(
                        f"the plugin name {ep.name!r} is declared by distribution {dist_name!r} and by {holder}; "
                        f"the latter keeps it ({PRECEDENCE_RULE})"), distribution=dist_name, collides_with=ep.name)
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the SDK down
                report_failure(ep.name, IMPORT_ERROR, exc, distribution=dist_name)
                continue
            dist = getattr(ep, "dist", None)
            _versions[ep.name] = dist.version if dist is not None else "unknown"
            if dist_name is not None:
                _distributions[ep.name] = dist_name
            _register_checked(module, ep.name)


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    hooks: tuple[str, ...]
    distribution: str | None = None


def plugin_infos() -> list[PluginInfo]:
    """The loaded plugins, their versions and the hooks they implement."""
    load_plugins()
    infos = []
    for name, plugin in pm.list_name_plugin():
        hooks = tuple(sorted(impl.name for impl in pm.get_hookcallers(plugin) or ()))
        infos.append(PluginInfo(name, _versions.get(name, "unknown"), hooks, _distributions.get(name)))
    return infos


def plugin_failures() -> list[PluginFailure]:
    """Every failure :data:`FAILURE_KINDS` names: plugins that failed to import or declare their hooks,
    and hooks that raised, registered something invalid or a name another plugin keeps.

    Collects every registry (:func:`add_collector`; the training stack included) so that all are reported.
    """
    load_plugins()
    for collect in list(_collectors):
        collect()
    return [failure for recorded in _failures.values() for failure in recorded]
