"""One sentence from a pydantic ValidationError: each problem as ``where: what`` (optionally with the
value given), joined by "; ". Configs, options, request bodies and model files all report this way."""

from __future__ import annotations

from pydantic import ValidationError


def validation_problems(exc: ValidationError, *, root: str = "<root>", with_input: bool = False) -> str:
    """``loc: msg[ (got input)]; ...`` for every error of ``exc``; ``root`` names an error on the whole value."""
    parts = []
    for error in exc.errors():
        where = ".".join(map(str, error["loc"])) or root
        parts.append(f"{where}: {error['msg']}" + (f" (got {error.get('input')!r})" if with_input else ""))
    return "; ".join(parts)
