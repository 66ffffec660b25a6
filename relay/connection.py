"""How a destination is connected to: its TLS (client certificate, CA bundle, server name) and
its egress proxy. Built once per destination when it is compiled, handed to the transport with
each request (``Request.via``).

Owns loading the certificate files into an ``ssl.SSLContext`` (every mistake a ConfigError
naming ``tls.cert_file``...) and splitting a proxy URL's credentials off its address. Never
opens a connection itself.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from relay.config import Config, Destination, TlsConfig
from relay.errors import ConfigError

DIRECT = "direct"  # a destination's ``proxy: direct``: no proxy, whatever delivery.proxy says


@dataclass(frozen=True, slots=True)
class Proxy:
    """An egress proxy: its address and, apart, its Basic credentials (secrets)."""

    url: str                        # http://host:port, no userinfo
    username: str | None = None
    password: str | None = None

    def shown(self) -> str:
        """The proxy as people may see it: the password masked."""
        if self.username is None:
            return self.url
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{self.username}:****@{rest}"

    def __repr__(self) -> str:
        return f"Proxy({self.shown()!r})"


@dataclass(frozen=True, slots=True)
class Via:
    """The connection options of one destination's requests (none of them: ``None``)."""

    ssl: ssl.SSLContext | None = None   # its own context (client cert, CA bundle), else shared
    server_name: str | None = None      # SNI / the name the server certificate must hold
    proxy: Proxy | None = None
    client_cert: bool = False           # ssl presents a client certificate (mTLS)

    def describe(self) -> dict[str, str]:
        """What ``relay render`` and test send show of it (secrets masked)."""
        shown: dict[str, str] = {}
        if self.proxy is not None:
            shown["proxy"] = self.proxy.shown()
        if self.ssl is not None:
            shown["tls"] = "client certificate" if self.client_cert else "own CA bundle"
        if self.server_name:
            shown["server_name"] = self.server_name
        return shown


def build_via(dest: Destination, config: Config) -> Via | None:
    """The destination's connection options, or None when it connects like any other."""
    problems: list[tuple[str, str]] = []
    context = None
    if dest.tls is not None:
        try:
            context = tls_context(dest.tls, config.delivery.ca_file)
        except ConfigError as exc:
            problems += exc.problems
    proxy = None
    raw = dest.proxy if dest.proxy is not None else config.delivery.proxy
    if raw is not None and raw.get_secret_value() != DIRECT:
        proxy = parse_proxy(raw.get_secret_value())
    if problems:
        raise ConfigError(problems)
    server_name = dest.tls.server_name if dest.tls is not None else None
    if context is None and proxy is None and server_name is None:
        return None
    return Via(context, server_name, proxy,
               client_cert=dest.tls is not None and dest.tls.cert_file is not None)


def tls_context(tls: TlsConfig, default_ca: str | None = None) -> ssl.SSLContext | None:
    """An SSLContext that verifies the server (``ca_file``, else delivery.ca_file and the system
    store) and presents ``cert_file`` / ``key_file``; ConfigError paths are ``tls.*``."""
    problems: list[tuple[str, str]] = []
    if (tls.cert_file is None) != (tls.key_file is None):
        missing = "key_file" if tls.key_file is None else "cert_file"
        problems.append((f"tls.{missing}", "cert_file and key_file go together (a client "
                                           "certificate needs its private key)"))
    for key in ("cert_file", "key_file", "ca_file"):
        path = getattr(tls, key)
        if path is not None and not Path(path).is_file():
            problems.append((f"tls.{key}", f"no such file: {path}"))
    if problems:
        raise ConfigError(problems)
    if tls.cert_file is None and tls.ca_file is None:
        return None  # server_name alone: the shared context does
    try:
        context = ssl.create_default_context(cafile=tls.ca_file or default_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([("tls.ca_file", f"cannot load CA bundle: {exc}")]) from exc
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            if "KEY_VALUES_MISMATCH" in str(exc) or reason == "KEY_VALUES_MISMATCH":
                message = "the private key in tls.key_file does not match this certificate"
            else:
                message = f"cannot load the client certificate and key (PEM expected): {reason}"
            raise ConfigError([("tls.cert_file", message)]) from exc
        except OSError as exc:
            raise ConfigError([("tls.cert_file", f"cannot read: {exc}")]) from exc
    return context


def parse_proxy(url: str) -> Proxy:
    """``http://user:pass@host:3128`` -> Proxy("http://host:3128", "user", "pass")."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(f"{parts.scheme}://{netloc}", user, password if user is not None else None)
