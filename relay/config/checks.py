"""Cross-field checks: the rules of a config that no one field's schema can express.

``check_config`` runs them on a validated ``Config`` (the parts of one that validated, when
``relay.config.load`` salvages a broken file), skipping every rule that reads a value the file
does not hold (``holds``): the URL, port and egress rules of each destination, the spool's
DSN and lease, the listener's protection, backoff and suspension orders. What needs compiling
(templates, signing keys) is checked by ``relay.destinations``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from relay.config.schema import Config, Destination, HmacAuth, OAuth2Auth
from relay.request import (
    host_form,
    host_is_rendered,
    literal_head,
    split_host_port,
    templated_host_port,
)
from relay.vocab import FORMAT_STATUSES


def holds(skip: frozenset[str], *paths: str) -> bool:
    """None of ``paths`` (``delivery.allowed_ports``), nor a section holding one, is in
    ``skip``: each has the value the file gave, or the default of a key it left out."""
    return not any(".".join(path.split(".")[:n]) in skip
                   for path in paths for n in range(1, path.count(".") + 2))


def check_config(config: Config, *, positions: tuple[int, ...] | None = None,
                 skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Cross-field rules that a schema alone cannot express.

    ``positions`` maps each destination to its index in the file (when broken entries were left
    out); a rule that reads a path in ``skip`` (``delivery.allowed_ports``, or a whole section:
    it failed validation, and its default stands in) is not run, so no problem is reported
    against values the file does not hold.
    """
    problems: list[tuple[str, str]] = []
    # (a spool.postgres that failed validation is not also "dsn: required")
    postgres = config.spool.backend == "postgres" and holds(skip, "spool.postgres")
    if postgres and config.spool.postgres.dsn is None:
        problems.append(("spool.postgres.dsn", "required for spool.backend postgres (or dsn_file)"))
    elif postgres and config.spool.postgres.dsn is not None:
        problems += _check_dsn(config.spool.postgres.dsn.get_secret_value())
    lease = config.spool.postgres.lease
    if postgres and lease is not None and holds(skip, "delivery.timeout"):
        longest = config.longest_timeout()
        if lease <= longest:
            # a claim that ends before its attempt lets another replica send it meanwhile
            problems.append(("spool.postgres.lease", f"must outlast every attempt: longer than "
                                                     f"the longest timeout ({longest:g}s)"))
    if config.spool.backend == "postgres" and config.spool.max_bytes:
        problems.append(("spool.max_bytes", "bounds the SQLite file only; for spool.backend "
                                            "postgres leave it 0 and size the database instead"))
    if config.delivery.backoff_initial > config.delivery.backoff_max and \
            holds(skip, "delivery.backoff_initial", "delivery.backoff_max"):
        problems.append(("delivery.backoff_initial", "must not exceed delivery.backoff_max"))
    if config.delivery.ca_file is not None:
        try:
            if not Path(config.delivery.ca_file).is_file():   # (a FIFO would block the read)
                raise OSError(f"no such file: {config.delivery.ca_file}")
            ssl.create_default_context(cafile=config.delivery.ca_file)
        except (OSError, ValueError, ssl.SSLError) as exc:
            problems.append(("delivery.ca_file", f"cannot load CA bundle: {exc}"))
    if config.health.suspend_for > config.health.suspend_max and \
            holds(skip, "health.suspend_for", "health.suspend_max"):
        problems.append(("health.suspend_for", "must not exceed health.suspend_max"))
    for where, cidrs in (("server.allow_cidrs", config.server.allow_cidrs),
                         ("delivery.allowed_networks", config.delivery.allowed_networks)):
        for i, cidr in enumerate(cidrs):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                problems.append((f"{where}[{i}]", f"not a CIDR such as 127.0.0.0/8: {cidr!r}"))
    if holds(skip, *(f"server.{key}" for key in (
            "listen", "token", "allow_unauthenticated", "allow_cidrs"))):
        problems += _check_open_listener(config)   # (an unset ${RELAY_TOKEN} is no "no token")
    if config.delivery.proxy is not None:
        problems += check_proxy(config.delivery.proxy.get_secret_value(), "delivery.proxy")
    return problems + _check_destinations(config, positions, skip)


def _check_destinations(config: Config, positions: tuple[int, ...] | None,
                        skip: frozenset[str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    seen_names: dict[str, int] = {}
    seen_ajo: dict[tuple[str, str], int] = {}
    for n, dest in enumerate(config.destinations):
        i = positions[n] if positions is not None else n
        at = f"destinations[{i}]"
        if dest.name in seen_names:
            problems.append((f"{at}.name", f"duplicate destination name {dest.name!r} "
                                           f"(also destinations[{seen_names[dest.name]}])"))
        seen_names.setdefault(dest.name, i)
        problems += _check_destination(dest, at, config, skip)
        if dest.format == "ajo" and dest.ajo is not None:
            key = (dest.ajo.ims_org, dest.ajo.sandbox.id)
            if key in seen_ajo:
                problems.append((f"{at}.ajo", "only one ajo destination per (ims_org, sandbox): "
                                             f"destinations[{seen_ajo[key]}] has the same"))
            seen_ajo.setdefault(key, i)
    return problems


def _check_open_listener(config: Config) -> list[tuple[str, str]]:
    """Closed by default: an API reachable from other machines needs a token or client
    networks, unless the operator says an open one is meant."""
    server = config.server
    host, _ = server.host_port
    if server.token or server.allow_unauthenticated or is_loopback(host):
        return []
    if server.allow_cidrs and not _every_address(server.allow_cidrs):
        return []
    if server.allow_cidrs:   # (0.0.0.0/0 and ::/0 passed as protection)
        return [("server.allow_cidrs", "lets every address in, which protects nothing: name "
                 "the client networks, or set server.token (or token_file), or set "
                 "server.allow_unauthenticated: true to run the API open")]
    return [("server.listen", f"{server.listen} is reachable from other machines and the API "
             "has no protection: set server.token (or server.token_file) or "
             "server.allow_cidrs, or set server.allow_unauthenticated: true to run it open")]


def _every_address(cidrs: Sequence[str]) -> bool:
    """A /0 among ``cidrs``: every IPv4 or every IPv6 address is let in."""
    for cidr in cidrs:
        with contextlib.suppress(ValueError):   # (a bad entry: named on its own)
            if ipaddress.ip_network(cidr, strict=False).prefixlen == 0:
                return True
    return False


def is_loopback(host: str) -> bool:
    """``127.0.0.1``, ``::1`` and ``localhost`` are; a wildcard or any other name is not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_destination(dest: Destination, at: str, config: Config,
                       skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    initial = dest.backoff_initial if dest.backoff_initial is not None \
        else config.delivery.backoff_initial
    longest = dest.backoff_max if dest.backoff_max is not None else config.delivery.backoff_max
    inherited = [f"delivery.{key}" for key in ("backoff_initial", "backoff_max")
                 if getattr(dest, key) is None]
    if (dest.backoff_initial is not None or dest.backoff_max is not None) and initial > longest \
            and holds(skip, *inherited):
        # (the same mistake in delivery is an error; here it was quietly clamped)
        where = "backoff_initial" if dest.backoff_initial is not None else "backoff_max"
        problems.append((f"{at}.{where}", f"the first backoff ({initial:g}s) must not exceed "
                                          f"the longest ({longest:g}s)"))
    if dest.format == "ajo" and dest.ajo is None:
        problems.append((f"{at}.ajo", "required for format ajo: {ims_org: ..., sandbox: "
                                      "{id: ..., name: ...}}"))
    if dest.format != "ajo" and dest.ajo is not None:
        problems.append((f"{at}.ajo", f"only used by format ajo (this is {dest.format})"))
    if dest.format == "template" and dest.template is None:
        problems.append((f"{at}.template", "required for format template: {method: ..., body: ...}"))
    if dest.format != "template":
        if dest.template is not None:
            problems.append((f"{at}.template", f"only used by format template (this is "
                                               f"{dest.format})"))
        if dest.allowed_hosts is not None:
            problems.append((f"{at}.allowed_hosts", "only used by format template"))
    if dest.statuses is not None:
        expressible = FORMAT_STATUSES[dest.format]
        for j, status in enumerate(dest.statuses):
            if status not in expressible:
                problems.append((f"{at}.statuses[{j}]",
                                 f"format {dest.format} cannot express status {status!r} "
                                 f"(it can: {', '.join(expressible)})"))
    if isinstance(dest.auth, HmacAuth):
        # each at its own key: secrets[1] was reported as auth.secret; an empty secret too,
        # not as "auth: hmac needs secret" (what an unset ${VAR} in it was said to cause)
        given = [] if dest.auth.secret is None else [(f"{at}.auth.secret", dest.auth.secret)]
        secrets = given + [(f"{at}.auth.secrets[{j}]", s) for j, s in enumerate(dest.auth.secrets)]
        if not secrets:
            problems.append((f"{at}.auth", "hmac needs secret, secrets or secret_file"))
        for where, secret in secrets:
            if not secret.get_secret_value().startswith("whsec_") \
                    or not secret.get_secret_value().removeprefix("whsec_").strip():
                problems.append((where, "a Standard Webhooks secret starts with 'whsec_' "
                                        "followed by base64 (a key, not nothing)"))
    if isinstance(dest.auth, OAuth2Auth):
        problems += _check_token_url(dest.auth.token_url, f"{at}.auth.token_url", config, skip)
    if dest.proxy is not None and dest.proxy.get_secret_value() != "direct":
        problems += check_proxy(dest.proxy.get_secret_value(), f"{at}.proxy")
    problems += _check_url(dest, at, config, skip)
    if dest.template is not None:   # a language's own URL goes out as the main one does
        hosts = dest.allowed_hosts
        if hosts is None:   # (default: the destination's url's host, not the variant's)
            with contextlib.suppress(ValueError):
                host = urlsplit(re.split(r"\{\{|\{%", dest.url, maxsplit=1)[0]).hostname
                hosts = (host,) if host else None
        for language, variant in dest.template.variants.items():
            if variant.url is not None:
                # (the destination's own port rule is checked when its renderer is
                # built: relay.payloads.template.TemplateRenderer)
                problems += _check_url(
                    dest.model_copy(update={"url": variant.url, "allowed_hosts": hosts}),
                    f"{at}.template.variants.{language}", config, skip)
    return problems


def _check_dsn(dsn: str) -> list[tuple[str, str]]:
    """A postgresql:// URL's shape (never echoed: it holds the password). Several hosts
    (``db1:5432,db2:5432``, which urllib cannot split) are left to the client, as the rest."""
    if "://" not in dsn or "," in dsn.partition("://")[2].partition("/")[0]:
        return []
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not one
    except ValueError:
        return [("spool.postgres.dsn", "not a postgresql:// URL its client can read (a password "
                                       "holding / # ? @ or : must be percent-encoded: / as %2F, "
                                       "# as %23)")]
    if parts.scheme not in ("postgresql", "postgres"):
        return [("spool.postgres.dsn", "must start with postgresql:// (or postgres://)")]
    # (check-config said OK to sslmode=bogus, and serve could not connect)
    modes = [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "sslmode"]
    if any(mode not in _SSL_MODES for mode in modes):
        return [("spool.postgres.dsn", f"sslmode must be one of {', '.join(_SSL_MODES)}")]
    return []


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _internal_literal(host: str, at: str, config: Config,
                      skip: frozenset[str]) -> list[tuple[str, str]]:
    """An internal IP literal outside delivery.allowed_networks, refused before every request:
    said now (a name is judged by what it resolves to, at send time)."""
    from relay.egress import Blocked, check_literal, parse_networks  # (aiohttp: lazily)

    if not holds(skip, "delivery.allowed_networks"):
        return []   # (its default, none, would refuse what the file may allow)
    try:
        check_literal(host, parse_networks(config.delivery.allowed_networks))
    except Blocked as exc:
        return [(at, str(exc))]
    except ValueError:
        pass   # a bad allowed_networks entry: named on its own
    return []


def _check_token_url(url: str, at: str, config: Config,
                     skip: frozenset[str]) -> list[tuple[str, str]]:
    """An oauth2 token_url: an http(s) URL, held to the relay's egress rules (its port in
    delivery.allowed_ports, an internal literal in delivery.allowed_networks). Not the
    destination's own allowed_ports: those are its host's, and an identity provider is
    another host."""
    problems = _check_http_url(url, at)
    if problems:
        return problems
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if port not in config.delivery.allowed_ports and holds(skip, "delivery.allowed_ports"):
        shown = ", ".join(str(p) for p in config.delivery.allowed_ports)
        problems.append((at, f"port {port} is not in delivery.allowed_ports ({shown})"))
    return problems + _internal_literal(parts.hostname or "", at, config, skip)


def _check_http_url(url: str, at: str) -> list[tuple[str, str]]:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as exc:
        return [(at, f"not a valid URL: {exc}")]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [(at, f"expected an http:// or https:// URL with a host (got {url!r})")]
    return []


def check_proxy(url: str, at: str) -> list[tuple[str, str]]:
    """An egress proxy: ``http://[user:password@]host:port`` (the value is never echoed: it
    may hold a password)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return [(at, "not a valid proxy URL: expected http://[user:password@]host:port")]
    if parts.scheme != "http" or not parts.hostname:
        return [(at, "expected http://[user:password@]host:port (the connection to the proxy is "
                     "plain HTTP; HTTPS destinations are tunnelled through it with CONNECT)")]
    if parts.path not in ("", "/") or parts.query:
        return [(at, "a proxy URL has no path or query: http://[user:password@]host:port")]
    del port
    return []


def _check_url(dest: Destination, at: str, config: Config,
               skip: frozenset[str]) -> list[tuple[str, str]]:
    """The configured URL as far as its literal part goes (a template's rendered URL is
    checked again before every request), its ports and, for templates, allowed_hosts.
    Against a delivery.allowed_ports that failed validation no port is checked: its default
    (80, 443) would refuse ports the file allows."""
    head = literal_head(dest.url)
    if head != dest.url and dest.format != "template":
        return [(f"{at}.url", "only template destinations may use Liquid in the url")]
    fixed = not host_is_rendered(dest.url)  # host and port are literal
    outer = config.delivery.allowed_ports if holds(skip, "delivery.allowed_ports") \
        else range(1, 65536)
    shown = ", ".join(str(p) for p in config.delivery.allowed_ports)
    problems: list[tuple[str, str]] = []
    try:
        parts = urlsplit(head)
        port = parts.port if fixed else templated_host_port(dest.url)
    except ValueError as exc:
        return [(f"{at}.url", f"not a valid URL: {exc}")]
    if parts.scheme not in ("http", "https") or "://" not in head:
        return [(f"{at}.url", "must start with https:// or http:// (the scheme cannot be a "
                              "template)")]
    if fixed and not parts.hostname:
        problems.append((f"{at}.url", "has no host"))
    elif fixed and parts.hostname:
        problems += _internal_literal(parts.hostname, f"{at}.url", config, skip)
    if "@" in parts.netloc:
        problems.append((f"{at}.url", "must not carry userinfo (user:password@); use auth"))
    if dest.format == "ajo" and parts.scheme != "https" and not dest.allow_insecure_http:
        problems.append((f"{at}.url", "ajo destinations need https:// (set allow_insecure_http: "
                                      "true to allow http, e.g. for a local test receiver)"))
    for j, own in enumerate(dest.allowed_ports or ()):
        if own not in outer:
            problems.append((f"{at}.allowed_ports[{j}]",
                             f"port {own} is not in delivery.allowed_ports ({shown})"))
    if fixed or port is not None:   # (a port written after a templated host is fixed too)
        if port is None:   # (not ``port or``: ":0" is a port given, and no port at all)
            port = 443 if parts.scheme == "https" else 80
        if port not in outer:
            problems.append((f"{at}.url", f"port {port} is not in delivery.allowed_ports ({shown})"))
        elif dest.allowed_ports and port not in dest.allowed_ports:
            problems.append((f"{at}.url", f"port {port} is not in this destination's "
                                          "allowed_ports"))
    if dest.format == "template":
        hosts: set[str] = set()
        for j, entry in enumerate(dest.allowed_hosts or ()):
            host, host_port = split_host_port(entry)
            hosts.add(host_form(host))
            if host_port is not None and host_port not in outer:
                problems.append((f"{at}.allowed_hosts[{j}]", f"port {host_port} is not in "
                                                             f"delivery.allowed_ports ({shown})"))
        if dest.allowed_hosts is None and not fixed:
            problems.append((f"{at}.allowed_hosts", "required when the url's host is a template"))
        elif dest.allowed_hosts is not None and fixed and parts.hostname \
                and host_form(parts.hostname) not in hosts:
            problems.append((f"{at}.url", f"host {parts.hostname!r} is not in allowed_hosts"))
    return problems


# ---------------------------------------------------------------------------------------------
# Passes before validation
