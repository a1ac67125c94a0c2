"""Which Host headers and Origins ``ccm serve`` answers (:mod:`ccm_sdk.app.access`)."""

from __future__ import annotations

import pytest

from ccm_sdk.app.access import AccessPolicy, split_host
from ccm_sdk.errors import InputError


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("localhost:7860", ("localhost", 7860)),
        ("LocalHost", ("localhost", None)),
        ("[::1]:7860", ("[::1]", 7860)),
        ("[::1]", ("[::1]", None)),
        ("127.0.0.1:", None),
        ("127.0.0.1:80x", None),
        ("[::1", None),
        ("[::1]x", None),
        ("", None),
    ],
)
def test_split_host(header, expected):
    assert split_host(header) == expected


def test_default_policy_is_the_loopback_names_on_the_port():
    policy = AccessPolicy.for_address("127.0.0.1", 7860)
    assert all(policy.host_allowed(h) for h in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860"))
    assert not any(policy.host_allowed(h) for h in ("127.0.0.1:7861", "127.0.0.1", "evil.example:7860", None, "0.0.0.0:7860"))
    assert policy.origin_allowed("http://localhost:7860") and policy.origin_allowed("HTTP://127.0.0.1:7860")
    assert not any(policy.origin_allowed(o) for o in ("http://evil.example", "https://127.0.0.1:7860", "http://127.0.0.1:7861", "null"))


def test_the_bound_address_is_added_and_wildcards_are_not():
    lan = AccessPolicy.for_address("192.168.1.5", 8000)
    assert lan.host_allowed("192.168.1.5:8000") and lan.origin_allowed("http://192.168.1.5:8000")
    assert AccessPolicy.for_address("fe80::1", 8000).host_allowed("[fe80::1]:8000")
    assert AccessPolicy.for_address("0.0.0.0", 8000).names == AccessPolicy.for_address("127.0.0.1", 8000).names
    assert "127.0.0.1:8000" in lan.hosts_text()
    assert AccessPolicy.for_address("127.0.0.1", 80).host_allowed("localhost")  # port 80 may go unsaid


def test_allowed_hosts_and_origins():
    policy = AccessPolicy.for_address("127.0.0.1", 7860, allow_hosts=["Box.LAN", "fe80::2"], allow_origins=["https://App.example/"])
    assert policy.host_allowed("box.lan") and policy.host_allowed("box.lan:443") and policy.host_allowed("[fe80::2]:1")
    assert policy.origin_allowed("https://app.example") and policy.is_foreign_allowed("https://app.example")
    assert not policy.is_foreign_allowed("http://127.0.0.1:7860")  # its own page needs no CORS headers
    anything = AccessPolicy.for_address("127.0.0.1", 7860, allow_hosts=["*"], allow_origins=["*"])
    assert anything.host_allowed("whatever.example:1") and anything.origin_allowed("https://any.example")
    assert not anything.origin_allowed("null")


@pytest.mark.parametrize("value", ["http://box.lan", "box.lan:8080", "box lan", "a/b", ""])
def test_bad_allowed_hosts_are_refused(value):
    with pytest.raises(InputError, match="--allow-host: expected a host name"):
        AccessPolicy.for_address("127.0.0.1", 7860, allow_hosts=[value])


@pytest.mark.parametrize("value", ["app.example", "ftp://app.example", "https://app.example/path", "https://", "https://a.example?q=1"])
def test_bad_allowed_origins_are_refused(value):
    with pytest.raises(InputError, match="--allow-origin: expected an origin"):
        AccessPolicy.for_address("127.0.0.1", 7860, allow_origins=[value])
