"""File and folder digests: contents count, places and times do not."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from ccm_sdk.utils.digest import TreeDigests, file_sha256, tree_sha256


def _folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 5000)  # over one 1 MiB chunk
    return root


def test_file_sha256_is_hashlib_over_the_bytes(tmp_path):
    folder = _folder(tmp_path / "m")
    data = (folder / "sub" / "weights.bin").read_bytes()
    assert file_sha256(folder / "sub" / "weights.bin") == hashlib.sha256(data).hexdigest()
    assert tree_sha256(folder / "sub" / "weights.bin") == hashlib.sha256(data).hexdigest()


def test_a_copy_elsewhere_has_the_same_digest_and_any_change_another(tmp_path):
    folder = _folder(tmp_path / "m")
    digest = tree_sha256(folder)
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "m2")  # new place, new modification times
    assert tree_sha256(copy) == digest
    (copy / "config.json").write_text('{"a": 2}')
    assert tree_sha256(copy) != digest
    shutil.rmtree(copy)
    shutil.copytree(folder, copy)
    (copy / "sub" / "weights.bin").rename(copy / "weights.bin")  # same bytes under another name
    assert tree_sha256(copy) != digest
    (copy / "extra.txt").write_text("")
    assert tree_sha256(copy) != tree_sha256(folder)


def test_tree_sha256_of_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        tree_sha256(tmp_path / "missing")


def test_tree_digests_read_again_only_when_a_file_changes(tmp_path, monkeypatch):
    from ccm_sdk.utils import digest as module

    folder = _folder(tmp_path / "m")
    reads = []
    original = module.tree_sha256
    monkeypatch.setattr(module, "tree_sha256", lambda path: reads.append(path) or original(path))
    digests = TreeDigests()
    first = digests.get(folder)
    assert digests.get(folder) == first and len(reads) == 1
    weights = folder / "sub" / "weights.bin"
    weights.write_bytes(b"retrained")
    second = digests.get(folder)
    assert second != first and second == original(folder) and len(reads) == 2
    # the same size and bytes written again: a new modification time reads it again, same digest
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert digests.get(folder) == second and len(reads) == 3
