"""One HTTP attempt as data: the ``Request`` rendering builds and signing extends, and the
``Exchange`` a transport gives back, before the retry policy judges it.

Knows nothing of payload formats, auth or sockets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Set
from dataclasses import field, replace
from typing import Any
from urllib.parse import urlsplit

from yarl import URL

from relay.frozen import frozen


@frozen
class Request:
    """One HTTP request, exactly as it will be sent."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # TLS and proxy options: a relay.connection.Via (Any: this module imports no other
    # part of the relay but relay.frozen)
    via: Any = field(default=None, repr=False)

    def with_headers(self, **extra: str) -> Request:
        return Request(self.method, self.url, merge_headers(self.headers, extra), self.body,
                       self.via)

    def routed(self, via: Any) -> Request:
        return self if via is None else replace(self, via=via)


def merge_headers(base: dict[str, str], extra: dict[str, str],
                  lowered: Set[str] | None = None) -> dict[str, str]:
    """``base`` with ``extra`` set on top; header names compare case-insensitively.
    ``lowered``: ``extra``'s names in lower case, when the caller has them already."""
    if lowered is None:
        lowered = {k.lower() for k in extra}
    merged = {k: v for k, v in base.items() if k.lower() not in lowered}
    merged.update(extra)
    return merged


@frozen
class Exchange:
    """What one attempt produced: a response (``status``) or an error class (``error``).

    Error classes are named by the transport: connect, connect_timeout, dns, tls, refused,
    timeout, reset, disconnected, invalid_url, client_error (see ``relay.policy``).
    """

    started_at: float                 # unix time the request was started
    duration: float                   # seconds until the response (or the error)
    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    excerpt: str | None = None        # the start of the response body
    error: str | None = None
    detail: str = ""                  # a human sentence for the error

    @property
    def error_text(self) -> str | None:
        """The activity log's ``error`` field of this attempt."""
        return None if self.error is None else f"{self.error}: {self.detail}"


def endpoint(url: str) -> str:
    """``scheme://host:port`` of a URL (the port written out): what host health is kept by."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (443 if parts.scheme == "https" else 80)
    host = (parts.hostname or "").lower()
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def has_markup(value: str) -> bool:
    """``value`` holds Liquid markup: what it becomes is known only once rendered."""
    return "{{" in value or "{%" in value


_MARKUP = re.compile(r"\{\{|\{%")


def literal_head(url: str) -> str:
    """A configured URL up to its first Liquid markup (the whole URL when it has none)."""
    return _MARKUP.split(url, maxsplit=1)[0]


def host_is_rendered(url: str) -> bool:
    """A configured URL's host (or port) comes from a template: markup starts before the
    path does."""
    head = literal_head(url)
    return head != url and "/" not in head.partition("://")[2]


_PORT_AFTER_TEMPLATE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*\}\}:([0-9]{1,5})(?=[/?#]|$)")


def templated_host_port(url: str) -> int | None:
    """The port a configured URL writes after a templated host (``http://{{ h }}:9000/x``
    -> 9000), else None: the port every rendered URL of it will have."""
    found = _PORT_AFTER_TEMPLATE.match(url)
    return int(found[1]) if found is not None else None


def host_form(host: str) -> str:
    """A host as a rendered URL's is compared (yarl's form, as aiohttp sends it): lower case,
    an IDNA name decoded (``xn--bcher-kva.example`` -> ``bücher.example``), an IPv6 address
    compressed (``::ffff:1.2.3.4`` -> ``::ffff:102:304``)."""
    try:
        return URL.build(scheme="http", host=host).host or host
    except ValueError:
        return host


def split_host_port(entry: str) -> tuple[str, int | None]:
    """``"host"`` -> ("host", None); ``"host:8443"`` -> ("host", 8443); ``"[::1]:443"`` too."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = entry.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return entry, None
