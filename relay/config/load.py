"""Loading: YAML in, a frozen ``Config`` out, or a ConfigError naming every bad path.

Loading runs four passes, each collecting every problem before failing:
  1. YAML parse (syntax errors carry the line; duplicate keys are errors, not "last one wins"),
  2. ``${NAME}`` / ``${NAME:-default}`` interpolation in every string value,
  3. ``*_file`` secrets read from disk (``token_file``, ``password_file``, ``key_file``, ``secret_file``),
  4. schema validation (unknown keys, wrong types, durations to seconds) and cross-field checks.
Defaults are written once, beside their field. Secrets are ``SecretStr`` and never appear in repr.
This module does no I/O after load and knows nothing of HTTP, SQLite or payload formats: what
needs compiling (templates, signing keys) is checked by ``relay.destinations``, which builds on
the ``Config`` made here.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydantic
import yaml

from relay.config.schema import (
    AjoConfig,
    BasicAuth,
    BearerAuth,
    Config,
    DeliveryConfig,
    Destination,
    HealthConfig,
    HmacAuth,
    JsonBody,
    JwtAuth,
    OAuth2Auth,
    RateLimit,
    RawBody,
    SandboxConfig,
    ServerConfig,
    SpoolConfig,
    TemplateConfig,
    TemplateVariant,
    TlsConfig,
)
from relay.errors import ConfigError
from relay.request import split_host_port
from relay.validation import join as _join
from relay.validation import problems_from
from relay.vocab import FORMAT_STATUSES

SECRET_FILE_KEYS = ("token_file", "password_file", "key_file", "secret_file", "dsn_file",
                    "client_secret_file")
# Under a destination's ``tls`` these name files loaded as they are (certificates, keys), not
# secrets read into the config: relative paths are made absolute against the config's folder.
TLS_FILE_KEYS = ("cert_file", "key_file", "ca_file")


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; raise ConfigError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read config file: {exc}")], source) from exc
    return parse_config(text, source=source, env=env, base_dir=Path(path).parent)


def parse_config(
    text: str,
    *,
    source: str = "config",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate config given as YAML text (see ``load_config``)."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError([("", f"YAML syntax error at {where}: {exc.problem}")], source) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([("", f"YAML error: {exc}")], source) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([("", f"the config must be a mapping of sections, got {_kind(raw)}")],
                          source)
    return validate_config(raw, source=source, env=env, base_dir=base_dir)


def validate_config(
    raw: dict[str, Any],
    *,
    source: str = "config",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate an already-parsed config mapping (see ``load_config``)."""
    env = os.environ if env is None else env
    problems: list[tuple[str, str]] = []
    data = _interpolate(raw, "", env, problems)
    data = _read_secret_files(data, "", base_dir or Path.cwd(), problems)
    try:
        config = Config.model_validate({**data, "source": source})
    except pydantic.ValidationError as exc:
        flagged = {path for path, _ in problems}
        problems += [p for p in problems_from(exc, data, known=_KNOWN_KEYS) if p[0] not in flagged]
        raise ConfigError(problems, source) from exc
    problems += check_config(config)
    if problems:
        raise ConfigError(problems, source)
    return config


def check_config(config: Config) -> list[tuple[str, str]]:
    """Cross-field rules that a schema alone cannot express."""
    problems: list[tuple[str, str]] = []
    if config.spool.backend == "postgres" and config.spool.postgres.dsn is None:
        problems.append(("spool.postgres.dsn", "required for spool.backend postgres (or dsn_file)"))
    if config.delivery.backoff_initial > config.delivery.backoff_max:
        problems.append(("delivery.backoff_initial", "must not exceed delivery.backoff_max"))
    if config.delivery.ca_file is not None:
        try:
            ssl.create_default_context(cafile=config.delivery.ca_file)
        except (OSError, ssl.SSLError) as exc:
            problems.append(("delivery.ca_file", f"cannot load CA bundle: {exc}"))
    if config.health.suspend_for > config.health.suspend_max:
        problems.append(("health.suspend_for", "must not exceed health.suspend_max"))
    for where, cidrs in (("server.allow_cidrs", config.server.allow_cidrs),
                         ("delivery.allowed_networks", config.delivery.allowed_networks)):
        for i, cidr in enumerate(cidrs):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                problems.append((f"{where}[{i}]", f"not a CIDR such as 127.0.0.0/8: {cidr!r}"))
    problems += _check_open_listener(config)
    if config.delivery.proxy is not None:
        problems += check_proxy(config.delivery.proxy.get_secret_value(), "delivery.proxy")

    seen_names: dict[str, int] = {}
    seen_ajo: dict[tuple[str, str], int] = {}
    for i, dest in enumerate(config.destinations):
        at = f"destinations[{i}]"
        if dest.name in seen_names:
            problems.append((f"{at}.name", f"duplicate destination name {dest.name!r} "
                                           f"(also destinations[{seen_names[dest.name]}])"))
        seen_names.setdefault(dest.name, i)
        problems += _check_destination(dest, at, config)
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
    if server.token or server.allow_cidrs or server.allow_unauthenticated or is_loopback(host):
        return []
    return [("server.listen", f"{server.listen} is reachable from other machines and the API "
             "has no protection: set server.token (or server.token_file) or "
             "server.allow_cidrs, or set server.allow_unauthenticated: true to run it open")]


def is_loopback(host: str) -> bool:
    """``127.0.0.1``, ``::1`` and ``localhost`` are; a wildcard or any other name is not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_destination(dest: Destination, at: str, config: Config) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
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
        secrets = ([dest.auth.secret] if dest.auth.secret else []) + list(dest.auth.secrets)
        if not secrets:
            problems.append((f"{at}.auth", "hmac needs secret, secrets or secret_file"))
        for secret in secrets:
            if not secret.get_secret_value().startswith("whsec_"):
                problems.append((f"{at}.auth.secret", "a Standard Webhooks secret starts with "
                                                      "'whsec_' followed by base64"))
                break
    if isinstance(dest.auth, OAuth2Auth):
        problems += _check_http_url(dest.auth.token_url, f"{at}.auth.token_url")
    if dest.proxy is not None and dest.proxy.get_secret_value() != "direct":
        problems += check_proxy(dest.proxy.get_secret_value(), f"{at}.proxy")
    problems += _check_url(dest, at, config)
    return problems


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


def _check_url(dest: Destination, at: str, config: Config) -> list[tuple[str, str]]:
    """The configured URL as far as its literal part goes (a template's rendered URL is
    checked again before every request), its ports and, for templates, allowed_hosts."""
    head, *templated = re.split(r"\{\{|\{%", dest.url, maxsplit=1)
    if templated and dest.format != "template":
        return [(f"{at}.url", "only template destinations may use Liquid in the url")]
    fixed = not templated or "/" in head.partition("://")[2]  # host and port are literal
    outer = config.delivery.allowed_ports
    shown = ", ".join(str(p) for p in outer)
    problems: list[tuple[str, str]] = []
    try:
        parts = urlsplit(head)
        port = parts.port if fixed else None
    except ValueError as exc:
        return [(f"{at}.url", f"not a valid URL: {exc}")]
    if parts.scheme not in ("http", "https") or "://" not in head:
        return [(f"{at}.url", "must start with https:// or http:// (the scheme cannot be a "
                              "template)")]
    if fixed and not parts.hostname:
        problems.append((f"{at}.url", "has no host"))
    if "@" in parts.netloc:
        problems.append((f"{at}.url", "must not carry userinfo (user:password@); use auth"))
    if dest.format == "ajo" and parts.scheme != "https" and not dest.allow_insecure_http:
        problems.append((f"{at}.url", "ajo destinations need https:// (set allow_insecure_http: "
                                      "true to allow http, e.g. for a local test receiver)"))
    for j, own in enumerate(dest.allowed_ports or ()):
        if own not in outer:
            problems.append((f"{at}.allowed_ports[{j}]",
                             f"port {own} is not in delivery.allowed_ports ({shown})"))
    if fixed:
        port = port or (443 if parts.scheme == "https" else 80)
        if port not in outer:
            problems.append((f"{at}.url", f"port {port} is not in delivery.allowed_ports ({shown})"))
        elif dest.allowed_ports and port not in dest.allowed_ports:
            problems.append((f"{at}.url", f"port {port} is not in this destination's "
                                          "allowed_ports"))
    if dest.format == "template":
        hosts: set[str] = set()
        for j, entry in enumerate(dest.allowed_hosts or ()):
            host, host_port = split_host_port(entry)
            hosts.add(host)
            if host_port is not None and host_port not in outer:
                problems.append((f"{at}.allowed_hosts[{j}]", f"port {host_port} is not in "
                                                             f"delivery.allowed_ports ({shown})"))
        if dest.allowed_hosts is None and not fixed:
            problems.append((f"{at}.allowed_hosts", "required when the url's host is a template"))
        elif dest.allowed_hosts is not None and fixed and parts.hostname \
                and parts.hostname.lower() not in hosts:
            problems.append((f"{at}.url", f"host {parts.hostname!r} is not in allowed_hosts"))
    return problems


# ---------------------------------------------------------------------------------------------
# Passes before validation


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: str, env: Mapping[str, str], problems: list[tuple[str, str]]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append((path, f"environment variable {name} is not set "
                               f"(write ${{{name}:-}} to make it optional)"))
        return ""

    return _ENV_REF.sub(replace, node)


def _read_secret_files(node: Any, path: str, base: Path, problems: list[tuple[str, str]]) -> Any:
    if isinstance(node, list):
        return [_read_secret_files(v, f"{path}[{i}]", base, problems) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[Any, Any] = {}
    if path.endswith(".tls") or path == "tls":
        return {key: str(base / value) if key in TLS_FILE_KEYS and isinstance(value, str) and value
                else value for key, value in node.items()}
    for key, value in node.items():
        if key in SECRET_FILE_KEYS:
            target = key.removesuffix("_file")
            if target in node:
                problems.append((_join(path, key), f"give either {target} or {key}, not both"))
                continue
            if not isinstance(value, str) or not value:
                problems.append((_join(path, key), "expected a file path"))
                continue
            file = Path(value) if Path(value).is_absolute() else base / value
            try:
                out[target] = file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                problems.append((_join(path, key), f"cannot read secret file: {exc}"))
                out[target] = ""  # placeholder, so the schema pass does not also say "missing"
        else:
            out[key] = _read_secret_files(value, _join(path, key), base, problems)
    return out


_MODELS = (Config, ServerConfig, SpoolConfig, DeliveryConfig, HealthConfig, Destination, AjoConfig,
           OAuth2Auth,
    RateLimit,
    SandboxConfig, BearerAuth, BasicAuth, JwtAuth, HmacAuth, OAuth2Auth, RateLimit, TlsConfig,
           TemplateConfig,
           TemplateVariant, JsonBody, RawBody)
_KNOWN_KEYS = frozenset(field for model in _MODELS for field in model.model_fields) - {"source"}


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)
