"""Atomic folder and file writes (ccm_sdk.utils.atomic): whole or absent, whatever happens in between."""

from __future__ import annotations

import json
import os

import pytest

from ccm_sdk.utils import atomic
from ccm_sdk.utils.atomic import (
    atomic_folder,
    remove_temporary_folders,
    replace_folder,
    temporary_folder,
    write_json_atomic,
    write_text_atomic,
)


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_folder_appears_whole_in_one_rename(tmp_path):
    target = tmp_path / "deep" / "out"
    with atomic_folder(target) as tmp:
        assert tmp == tmp_path / "deep" / ".tmp-out" and not target.exists()
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert _tree(target) == ["a.txt", "sub", "sub/b.txt"]
    assert _tree(tmp_path / "deep") == ["out", "out/a.txt", "out/sub", "out/sub/b.txt"]  # nothing left beside it


def test_a_folder_replaces_the_old_one(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(target) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_keeps_the_previous_folder_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "kept.txt").write_text("kept")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_folder(target) as tmp:
            (tmp / "partial.txt").write_text("partial")
            raise RuntimeError("half-way")
    assert _tree(target) == ["kept.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_writer_leaves_only_temporary_folders_which_are_cleaned(tmp_path):
    tmp = temporary_folder(tmp_path / "out")  # as a process killed before the rename leaves it
    (tmp / "partial.txt").write_text("partial")
    (tmp_path / ".old-out").mkdir()
    (tmp_path / "keep").mkdir()
    assert not (tmp_path / "out").exists()
    again = temporary_folder(tmp_path / "out")  # the next write starts from an empty folder
    assert again == tmp and _tree(again) == []
    remove_temporary_folders(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    remove_temporary_folders(tmp_path / "missing")  # nothing to clean


def test_replace_folder_fsyncs_every_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    tmp = temporary_folder(tmp_path / "out")
    (tmp / "a").write_text("a")
    (tmp / "b").write_text("b")
    assert replace_folder(tmp, tmp_path / "out") == tmp_path / "out"
    assert events == ["fsync", "fsync", "replace"]


def test_files_are_written_whole(tmp_path):
    path = write_text_atomic(tmp_path / "note.txt", "hello")
    assert path.read_text() == "hello"
    write_json_atomic(tmp_path / "data.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "data.json").read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "note.txt"]


def test_a_failed_file_write_keeps_the_previous_file(tmp_path):
    write_json_atomic(tmp_path / "data.json", {"version": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "data.json", {"version": object()})  # not JSON: fails before anything is written
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "data.json", 42)  # fails while writing the temporary file
    assert json.loads((tmp_path / "data.json").read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]
