"""Atomic writes: a file or a folder is either there whole or not at all, whenever the process dies.

A folder is assembled under a hidden sibling name (``.tmp-<name>``), its files are fsynced, and it
is renamed into place with ``os.replace``; a folder already there is first renamed aside
(``.old-<name>``) and removed after. A file is written to ``.<name>.tmp``, fsynced and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"


def temporary_folder(path: str | os.PathLike) -> Path:
    """A fresh, empty ``.tmp-<name>`` beside ``path`` (whatever an interrupted write left there is removed)."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def sync_folder(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder``, so a rename cannot land before the data (power loss, not just SIGKILL)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def replace_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``path`` in one rename, replacing what was there."""
    tmp, path = Path(tmp), Path(path)
    sync_folder(tmp)
    if path.exists():
        old = path.with_name(f"{OLD_PREFIX}{path.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` in one rename, on error it is removed."""
    tmp = temporary_folder(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, path)


def remove_temporary_folders(root: str | os.PathLike) -> None:
    """Remove the ``.tmp-``/``.old-`` folders that processes killed while writing left in ``root``."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``.<name>.tmp``, fsync, then rename into place: the file is complete or absent."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """``data`` as JSON, written with :func:`write_text_atomic`."""
    return write_text_atomic(path, json.dumps(data, indent=indent))


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a folder to write into (it may not exist yet): not a file, not under a file.

    Checked before any work starts, so a typo costs nothing; ``what`` names the setting in the error.
    """
    from ..errors import InputError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what}: expected a folder to write into, got the file {str(path)!r}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{what}: {str(path)!r} lies under {str(parent)!r}, which is a file, not a folder")
            break
    return path
