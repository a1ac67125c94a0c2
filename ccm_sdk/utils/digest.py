"""SHA-256 digests of files and folders: what a file holds, not where it lies or when it was written.

A folder's digest covers each file's path relative to it and its bytes (symlinks followed, as a
hub cache's snapshot folders are made of them), so the same model copied, cloned or checked out
elsewhere has the same digest and a model trained again in the same place has another.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            sha.update(chunk)
    return sha.hexdigest()


def tree_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a folder's files (their relative paths and contents, in path order), or of one file."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no file or folder at {str(root)!r}")
    sha = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        name = file.relative_to(root).as_posix()
        sha.update(f"{len(name)}:{name}:".encode())
        sha.update(file_sha256(file).encode())
    return sha.hexdigest()


class TreeDigests:
    """:func:`tree_sha256` remembered while no file under the path changes size or modification time.

    For callers that ask about the same model many times in one run (the eval's cells): the
    bytes are read once, and read again if a file is replaced, grown or touched.
    """

    def __init__(self):
        self._known: dict[Path, tuple[tuple, str]] = {}

    @staticmethod
    def _stat(root: Path) -> tuple:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        return tuple((p.as_posix(), (st := p.stat()).st_size, st.st_mtime_ns) for p in files)

    def get(self, path: str | os.PathLike) -> str:
        root = Path(path).resolve()
        stat = self._stat(root)
        known = self._known.get(root)
        if known is None or known[0] != stat:
            known = (stat, tree_sha256(root))
            self._known[root] = known
        return known[1]
