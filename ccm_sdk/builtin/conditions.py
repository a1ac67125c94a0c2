"""Registers the built-in conditions through the public hook."""

from ..conditions import BUILTIN_CONDITIONS
from ..hookspecs import hookimpl


@hookimpl
def register_conditions(register):
    for condition_cls in BUILTIN_CONDITIONS:
        register(condition_cls)
