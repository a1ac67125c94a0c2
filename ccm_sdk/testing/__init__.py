"""Test helpers for ccm-sdk and its plugins: tiny models (``tiny``) and shared test base classes.

``from ccm_sdk.testing import ConditionTestBase`` works; it is imported on first use, so
``ccm_sdk.testing.tiny`` does not pull in pytest.
"""

from __future__ import annotations

__all__ = ["ConditionTestBase", "sample_photos"]


def __getattr__(name: str):
    if name in __all__:
        from . import conditions

        return getattr(conditions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
