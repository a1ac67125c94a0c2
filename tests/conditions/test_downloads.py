"""Conditions whose networks are downloaded (hed, depth, pose): listed as such, and failing at once offline.

No test here touches the network: the hub cache is an empty temporary folder, and the connection
probe is either skipped (HF_HUB_OFFLINE) or replaced.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ccm_sdk.cli import main
from ccm_sdk.conditions import weights
from ccm_sdk.errors import MissingModelError
from ccm_sdk.registry import conditions

DOWNLOADED = ("hed", "depth", "pose")


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture()
def no_network(monkeypatch):
    """Any connection attempt is a test failure."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the network was touched: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _installed(name: str) -> None:
    if name not in conditions:
        pytest.skip(f"the {name} condition plugin is not installed")


@pytest.mark.parametrize("name", DOWNLOADED)
def test_offline_fails_at_once_with_the_download_hint(name, empty_cache, no_network, monkeypatch):
    _installed(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(MissingModelError) as info:
        conditions.get(name)()
    assert time.perf_counter() - start < 5.0
    repo = conditions.get(name).weights
    assert f"hf download {repo}" in str(info.value) and "model=PATH" in str(info.value)


@pytest.mark.parametrize("name", DOWNLOADED)
def test_unreachable_hub_reads_the_cache_only(name, empty_cache, no_network, monkeypatch):
    _installed(name)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "hub_reachable", lambda: False)  # as the probe answers with no network
    start = time.perf_counter()
    with pytest.raises(MissingModelError, match="offline: local cache only"):
        conditions.get(name)()
    assert time.perf_counter() - start < 5.0


def test_the_probe_gives_up_after_its_timeout(monkeypatch):
    release = threading.Event()

    def hang(*args, **kwargs):  # a name look-up that hangs until the test ends
        release.wait(30)
        raise OSError("gave up")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    try:
        assert weights.hub_reachable.__wrapped__(timeout=0.2) is False
        assert time.perf_counter() - start < 2.0
    finally:
        release.set()

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    assert weights.hub_reachable.__wrapped__(timeout=1.0) is False

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    assert weights.hub_reachable.__wrapped__(timeout=1.0) is True


def test_conditions_listing_marks_what_needs_a_download(empty_cache, capsys):
    for name in DOWNLOADED:
        _installed(name)
    assert main(["conditions"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in DOWNLOADED:
        assert f"[needs download: {conditions.get(name).weights}]" in lines[name]
    assert "needs download" not in lines["canny"] and "needs download" not in lines["sketch"]
    snapshot = empty_cache / f"models--{conditions.get('hed').weights.replace('/', '--')}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "ControlNetHED.pth").write_bytes(b"")
    assert main(["conditions"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "needs download" not in lines["hed"] and "needs download" in lines["depth"]
