"""Who may talk to ``ccm serve``: the Host names and browser Origins it answers.

Any web page a user visits can make the browser send requests to 127.0.0.1. Two checks stop
that. First, the Host header must name this server. A DNS-rebinding page's requests carry the
page's own host name, so they fail this check. Second, an Origin header must be this server's
own origin. Browsers send Origin on cross-site requests and on every POST.
``--allow-host`` and ``--allow-origin`` open either check on purpose.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import InputError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
ANY = "*"


def _bracketed(name: str) -> str:
    """``name`` as it appears in a Host header: lower case, an IPv6 address in brackets."""
    name = name.strip().lower()
    if name.startswith("["):
        return name
    try:
        if isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address):
            return f"[{name}]"
    except ValueError:
        pass
    return name


def split_host(header: str) -> tuple[str, int | None] | None:
    """``name[:port]`` from a Host header as (bracketed lower-case name, port), or None if it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        name, rest = header[: end + 1], header[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
    else:
        name, _, port = header.partition(":") if ":" in header else (header, "", None)
    if not name or (port is not None and not port.isdigit()):
        return None
    return name, int(port) if port is not None else None


def _check_allowed_host(value: str) -> str:
    if value == ANY:
        return value
    name = _bracketed(value)
    parsed = split_host(name)
    if parsed is None or parsed[1] is not None or "/" in name or any(c.isspace() for c in name):
        raise InputError(f"--allow-host: expected a host name or address without a scheme or port (e.g. mybox.lan), got {value!r}")
    return name


def _check_allowed_origin(value: str) -> str:
    if value == ANY:
        return value
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InputError(f"--allow-origin: expected an origin such as https://app.example or http://mybox.lan:8080, got {value!r}")
    return value.strip().rstrip("/").lower()


@dataclass(frozen=True)
class AccessPolicy:
    """The Host names and Origins a server on ``port`` answers to (build it with :meth:`for_address`)."""

    port: int
    names: frozenset[str]
    extra_hosts: frozenset[str] = frozenset()
    extra_origins: frozenset[str] = frozenset()

    @classmethod
    def for_address(cls, host: str, port: int, *, allow_hosts: tuple[str, ...] | list[str] = (),
                    allow_origins: tuple[str, ...] | list[str] = ()) -> AccessPolicy:
        """The loopback names and the bound address on the bound port, plus what the options add."""
        names = set(LOOPBACK_NAMES)
        if host not in WILDCARD_ADDRESSES:
            names.add(_bracketed(host))
        return cls(port, frozenset(names), frozenset(_check_allowed_host(h) for h in allow_hosts),
                   frozenset(_check_allowed_origin(o) for o in allow_origins))

    def own_origins(self) -> list[str]:
        """The origins of this server's own page, as a browser writes them."""
        origins = [f"http://{name}:{self.port}" for name in sorted(self.names)]
        return origins + ([f"http://{name}" for name in sorted(self.names)] if self.port == 80 else [])

    def hosts_text(self) -> str:
        listed = [f"{name}:{self.port}" for name in sorted(self.names)] + sorted(self.extra_hosts)
        return ", ".join(listed)

    def host_allowed(self, header: str | None) -> bool:
        """The server's own names on its port; an ``--allow-host`` name on any port (a proxy in front may use another)."""
        if header is None:
            return False
        parsed = split_host(header)
        if parsed is None:
            return False
        name, port = parsed
        if ANY in self.extra_hosts or name in self.extra_hosts:
            return True
        return name in self.names and (port == self.port or (port is None and self.port == 80))

    def origin_allowed(self, origin: str) -> bool:
        origin = origin.strip().lower()
        return origin in self.own_origins() or self.is_foreign_allowed(origin)

    def is_foreign_allowed(self, origin: str) -> bool:
        """An origin that ``--allow-origin`` lets in (it gets CORS headers, so a page there can read the answers)."""
        origin = origin.strip().lower()
        return origin != "null" and (ANY in self.extra_origins or origin in self.extra_origins)
