"""Plugin manager: built-in plugins plus ``ccm_sdk`` entry points, loaded lazily, once.

``CCM_PLUGINS=a,b`` loads only the named entry-point plugins (empty: none);
``CCM_STRICT_PLUGINS=1`` re-raises a broken plugin's error instead of reporting and skipping it.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .errors import PluginError
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
_failures: dict[str, PluginFailure] = {}
_versions: dict[str, str] = {}


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    stage: str  # "import", "hooks" or "register"
    error: str


def strict_mode() -> bool:
    return os.environ.get("CCM_STRICT_PLUGINS", "").lower() in ("1", "true", "yes")


def report_failure(plugin: str, stage: str, exc: BaseException) -> None:
    """Record a broken plugin, warn, and re-raise in strict mode."""
    failure = PluginFailure(plugin, stage, f"{type(exc).__name__}: {exc}")
    _failures[plugin] = failure
    if strict_mode():
        raise PluginError(f"plugin {plugin!r} failed at {stage}: {failure.error}") from exc
    warnings.warn(f"ccm_sdk: skipping plugin {plugin!r} ({stage}): {failure.error}", stacklevel=3)


def _allowed() -> set[str] | None:
    raw = os.environ.get("CCM_PLUGINS")
    return None if raw is None else {n.strip() for n in raw.split(",") if n.strip()}


def _register_checked(module, name: str) -> None:
    pm.register(module, name=name)
    try:
        pm.check_pending()  # catches misspelled hook names
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        report_failure(name, "hooks", exc)


def load_plugins() -> None:
    """Register the built-in plugins and every allowed entry point; safe to call often."""
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
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            if allowed is not None and ep.name not in allowed and dist_name not in allowed:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the SDK down
                report_failure(ep.name, "import", exc)
                continue
            _versions[ep.name] = dist.version if dist is not None else "unknown"
            _register_checked(module, ep.name)


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    hooks: tuple[str, ...]


def plugin_infos() -> list[PluginInfo]:
    """The loaded plugins, their versions and the hooks they implement."""
    load_plugins()
    infos = []
    for name, plugin in pm.list_name_plugin():
        hooks = tuple(sorted(impl.name for impl in pm.get_hookcallers(plugin) or ()))
        infos.append(PluginInfo(name, _versions.get(name, "unknown"), hooks))
    return infos


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to import, declare hooks, or register, with their errors."""
    load_plugins()
    return list(_failures.values())
