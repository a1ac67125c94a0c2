"""Built-in adapters: CCM's unified adapter."""

from ..hookspecs import hookimpl
from ..models.adapter import UnifiedAdapter


@hookimpl
def register_adapters(register):
    register(UnifiedAdapter)
