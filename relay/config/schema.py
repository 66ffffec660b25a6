"""The configuration schema: frozen, typed sections with every default written once, beside its field.

Durations are seconds (floats) once loaded; secrets are ``SecretStr`` and never appear in repr.
Validation of one field lives here; rules that span fields live in ``relay.config.load``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

from relay.vocab import CHANNELS, Channel, Format, Status

# ---------------------------------------------------------------------------------------------
# Scalar types

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: Any) -> float:
    """``"90s"`` -> 90.0; also ``100ms``, ``30m``, ``24h``, ``7d`` and sums such as ``1h30m``."""
    hint = "expected a duration such as '100ms', '90s', '30m', '24h' or '7d'"
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"{hint} (got {value!r}; a bare number has no unit)")
    text = value.strip()
    if not _DURATION_FULL.fullmatch(text):
        raise ValueError(f"{hint} (got {value!r})")
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _empty_secret_is_none(value: Any) -> Any:
    # `token: "${RELAY_TOKEN:-}"` with the variable unset means "no token", not "empty token".
    return None if value == "" else value


OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_empty_secret_is_none)]


# ---------------------------------------------------------------------------------------------
# Sections

def _valid_listen(value: str) -> str:
    split_listen(value)
    return value


class ServerConfig(_Model):
    listen: Annotated[str, AfterValidator(_valid_listen)] = "127.0.0.1:8080"  # port 0: any free
    token: OptionalSecret = None                   # Bearer token for /v1/* (or token_file)
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    max_batch: Annotated[int, Field(ge=1, le=100_000)] = 500
    drain_timeout: Duration = 20.0                 # SIGTERM: time given to in-flight work
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 1024  # more: 503 at once
    read_timeout: PositiveDuration = 30.0          # for a request's headers and body, and
                                                   # the idle time of a kept-alive connection
    allow_cidrs: tuple[str, ...] = ()              # for /v1/*; empty = any client address
    # A non-loopback listen address needs token or allow_cidrs unless this says it is meant.
    allow_unauthenticated: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"   # or RELAY_LOG_LEVEL
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal, else json

    @property
    def host_port(self) -> tuple[str, int]:
        return split_listen(self.listen)


class PostgresConfig(_Model):
    dsn: SecretStr | None = None                   # postgresql://user:password@host/db (or dsn_file)
    schema_: Annotated[str, Field(alias="schema", min_length=1, max_length=63)] = "relay"
    pool_size: Annotated[int, Field(ge=1, le=1000)] = 10
    lease: PositiveDuration | None = None          # a claimed delivery's lease; default timeout + 30s


class SpoolConfig(_Model):
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: str = "./relay-spool.db"                 # SQLite file (WAL mode)
    postgres: PostgresConfig = PostgresConfig()
    max_events: Annotated[int, Field(ge=1)] = 1_000_000  # events awaiting delivery; then 503
    retention: Duration = 7 * 86400.0              # finished records kept this long
    dedupe_window: Duration = 86400.0              # a repeated event id within it is a duplicate


class RateLimit(_Model):
    """A token bucket: ``per_second`` tokens a second, at most ``burst`` saved up."""

    per_second: Annotated[float, Field(gt=0, le=1_000_000)]
    burst: Annotated[int, Field(ge=1, le=1_000_000)] | None = None   # default: per_second, at least 1


class TlsConfig(_Model):
    """A destination's TLS: a client certificate (mTLS), its own CA bundle and server name.

    File paths, not secrets: they are loaded into an ``ssl.SSLContext`` when the destination is
    compiled (and again when one of them changes, see relay.reload)."""

    cert_file: str | None = None                   # PEM client certificate (chain)
    key_file: str | None = None                    # PEM private key of cert_file
    ca_file: str | None = None                     # CA bundle that verifies the destination
    server_name: str | None = None                 # SNI and the name the certificate must hold


class DeliveryConfig(_Model):
    timeout: PositiveDuration = 90.0               # per attempt
    max_retries: Annotated[int, Field(ge=0, le=100)] = 5
    retry_window: Duration = 1800.0
    unreachable_window: Duration = 86400.0         # when the host cannot be reached at all
    backoff_initial: Duration = 30.0
    backoff_max: Duration = 600.0
    allowed_ports: tuple[Port, ...] = (80, 443)   # the outer bound for every destination
    allowed_networks: tuple[str, ...] = ()         # internal CIDRs destinations may reach
    concurrency: Annotated[int, Field(ge=1, le=10_000)] = 64
    per_host_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 16
    ca_file: str | None = None                     # extra CA bundle (PEM) for TLS verification
    proxy: OptionalSecret = None                   # egress proxy for every destination:
                                                   # http://[user:password@]host:port (secret:
                                                   # its credentials); see docs/controls.md
    rate_limit: RateLimit | None = None            # default for destinations without their own


class HealthConfig(_Model):
    window: PositiveDuration = 60.0
    min_failures: Annotated[int, Field(ge=1)] = 20
    failure_rate: Annotated[float, Field(gt=0, le=1)] = 0.9
    consecutive_failures: Annotated[int, Field(ge=1)] = 10
    suspend_for: PositiveDuration = 60.0
    suspend_max: PositiveDuration = 1800.0


class SandboxConfig(_Model):
    id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]


class AjoConfig(_Model):
    ims_org: Annotated[str, Field(min_length=1)]
    sandbox: SandboxConfig


class NoAuth(_Model):
    type: Literal["none"]


class BearerAuth(_Model):
    type: Literal["bearer"]
    token: SecretStr


class BasicAuth(_Model):
    type: Literal["basic"]
    username: str
    password: SecretStr


class JwtAuth(_Model):
    type: Literal["jwt"]
    algorithm: Literal[
        "HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
        "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA",
    ] = "HS256"
    key: SecretStr                                 # HMAC secret or PEM private key
    issuer: str | None = None
    subject: str | None = None
    audience: str | None = None
    ttl: PositiveDuration = 300.0
    claims: dict[str, Any] = Field(default_factory=dict)
    header: str = "Authorization"
    scheme: str = "Bearer"                         # "" sends the bare token
    key_id: str | None = None                      # JWT header "kid"


class HmacAuth(_Model):
    type: Literal["hmac"]
    secret: SecretStr | None = None                # whsec_<base64>
    secrets: tuple[SecretStr, ...] = ()            # several during rotation: all sign


class OAuth2Auth(_Model):
    """OAuth 2.0 client credentials (RFC 6749 section 4.4)."""

    type: Literal["oauth2"]
    token_url: Annotated[str, Field(min_length=1)]
    client_id: Annotated[str, Field(min_length=1)]
    client_secret: SecretStr                       # or client_secret_file
    scope: str | None = None                       # space-separated scopes
    audience: str | None = None                    # sent as "audience" (Auth0, Okta...)
    header: str = "Authorization"
    scheme: str = "Bearer"


Auth = Annotated[NoAuth | BearerAuth | BasicAuth | JwtAuth | HmacAuth | OAuth2Auth,
                 Field(discriminator="type")]


class JsonBody(_Model):
    type: Literal["json"]
    fields: dict[str, str] = Field(default_factory=dict)   # values are Liquid templates


class RawBody(_Model):
    type: Literal["raw"]
    template: str = ""                             # Liquid template of the whole body
    content_type: str = "text/plain; charset=utf-8"


Body = Annotated[JsonBody | RawBody, Field(discriminator="type")]
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]


class TemplateVariant(_Model):
    """A per-language override; anything not given comes from the destination's template."""

    url: str | None = None
    method: Method | None = None
    headers: dict[str, str] | None = None
    body: Body | None = None


class TemplateConfig(_Model):
    method: Method = "POST"
    body: Body | None = None                       # none: no body (typical for GET/DELETE)
    variants: dict[str, TemplateVariant] = Field(default_factory=dict)


class Destination(_Model):
    name: Name
    format: Format
    url: Annotated[str, Field(min_length=1)]
    channels: tuple[Channel, ...] = CHANNELS
    statuses: tuple[Status, ...] | None = None     # none: every status the format can express
    ajo: AjoConfig | None = None
    allow_insecure_http: bool = False
    auth: Auth = NoAuth(type="none")
    headers: dict[str, str] = Field(default_factory=dict)
    allowed_hosts: tuple[str, ...] | None = None   # template: "host" or "host:port" a rendered
                                                   # URL may reach (default: the url's host)
    allowed_ports: tuple[Port, ...] | None = None  # ports of this destination (default: the url's
                                                   # own port); within delivery.allowed_ports
    template: TemplateConfig | None = None
    # Per-destination overrides of delivery.*; none = use the delivery section's value.
    timeout: PositiveDuration | None = None
    max_retries: Annotated[int, Field(ge=0, le=100)] | None = None
    retry_window: Duration | None = None
    unreachable_window: Duration | None = None
    backoff_initial: Duration | None = None
    backoff_max: Duration | None = None
    rate_limit: RateLimit | None = None            # none: delivery.rate_limit (none: unlimited)
    tls: TlsConfig | None = None                   # client certificate, CA bundle, server name
    proxy: OptionalSecret = None                   # none: delivery.proxy; "direct": no proxy


class Config(_Model):
    server: ServerConfig = ServerConfig()
    spool: SpoolConfig = SpoolConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    health: HealthConfig = HealthConfig()
    destinations: tuple[Destination, ...] = ()
    source: str = Field(default="config", exclude=True)  # file the config came from

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ("127.0.0.1", 8080); ``"[::1]:8080"`` -> ("::1", 8080)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:8080 (got {listen!r})")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
