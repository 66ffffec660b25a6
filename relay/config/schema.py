"""The configuration schema: frozen, typed sections with every default written once, beside its field.

Durations are seconds (floats) once loaded; secrets are ``SecretStr`` and never appear in repr.
Validation of one field lives here; rules that span fields live in ``relay.config.checks``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

from relay.config.fields import (
    MAX_DESTINATIONS,
    NOT_BOOL,
    AuthHeader,
    Duration,
    FilePath,
    Headers,
    HeaderSecret,
    HeaderValue,
    Name,
    Port,
    PositiveDuration,
    RequiredSecret,
    allowed_host,
    header_secret,
    header_text,
    is_host_name,
    json_claims,
    one_per_case,
)
from relay.vocab import CHANNELS, Channel, Format, Status


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _empty_secret_is_none(value: Any) -> Any:
    # `token: "${RELAY_TOKEN:-}"` with the variable unset means "no token", not "empty token".
    return None if value == "" else value


OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_empty_secret_is_none)]
# RFC 9110's field value: visible ASCII, spaces inside (an inner space worked and still does:
# the relay compares the header's token stripped)
_VISIBLE_ASCII = re.compile(r"[!-~](?:[ !-~]*[!-~])?")


def sendable_token(value: SecretStr | None) -> SecretStr | None:
    # (a trailing newline from ${RELAY_TOKEN}, a space, a non-ASCII character: no HTTP client
    # sends it as the relay holds it, so every /v1 request would be answered 401)
    if value is not None and not _VISIBLE_ASCII.fullmatch(value.get_secret_value()):
        raise ValueError("must be visible ASCII (letters, digits, punctuation; spaces only "
                         "inside): no line break, tab, control or non-ASCII character and no "
                         "space at either end, which an Authorization header cannot carry as "
                         "given (a token_file's trailing newline is stripped)")
    return value


# ---------------------------------------------------------------------------------------------
# Sections

def _valid_listen(value: str) -> str:
    host, _ = split_listen(value)
    if not is_host_name(host):   # ("999.1.1.1", a tab: check-config said OK, serve failed)
        raise ValueError(f"{host!r} is not a host name or IP address to listen on")
    return value


def _d(default: Any, description: str) -> Any:
    """A field's default and its meaning, written once (docs/configuration.md is made from it)."""
    if callable(default) and not isinstance(default, BaseModel):
        return Field(default_factory=default, description=description)
    return Field(default, description=description)


class ServerConfig(_Model):
    """The local HTTP API: where it listens, who may use it, request bounds, logs."""

    listen: Annotated[str, AfterValidator(_valid_listen)] = _d(
        "127.0.0.1:8080", "host:port of the HTTP API (port 0: any free port). Restart to change.")
    token: Annotated[OptionalSecret, AfterValidator(sendable_token)] = _d(
        None, "Bearer token required on /v1/* (or token_file); empty or unset: none. Visible "
              "ASCII only (spaces only inside; no line breaks or non-ASCII characters).")
    max_body_bytes: Annotated[int, NOT_BOOL, Field(ge=1024)] = _d(
        1_048_576, "Largest request body; larger bodies get 413. Restart to change.")
    max_batch: Annotated[int, NOT_BOOL, Field(ge=1, le=100_000)] = _d(
        500, "Most events in one POST /v1/events array.")
    drain_timeout: Duration = _d(20.0, "On SIGTERM, time given to in-flight work.")
    max_connections: Annotated[int, NOT_BOOL, Field(ge=1, le=1_000_000)] = _d(
        1024, "Open connections at most (per worker process, with server.workers > 1); more "
              "are answered 503 at once and closed.")
    read_timeout: PositiveDuration = _d(
        30.0, "Time for a request's headers and body, and the idle time of a kept-alive "
              "connection.")
    allow_cidrs: tuple[str, ...] = _d(
        (), "Client networks allowed on /v1/* (e.g. [10.0.0.0/8]); empty: any client address.")
    allow_unauthenticated: bool = _d(
        False, "A non-loopback listen address needs token or allow_cidrs unless this says an "
               "open API is meant.")
    log_level: Literal["debug", "info", "warning", "error"] = _d(
        "info", "Log level (RELAY_LOG_LEVEL overrides).")
    log_format: Literal["auto", "json", "text"] = _d(
        "auto", "auto: text on a terminal, else JSON lines (RELAY_LOG_FORMAT overrides).")
    workers: Annotated[int, NOT_BOOL, Field(ge=1, le=64)] = _d(
        1, "Processes that ingest and deliver, sharing server.listen (SO_REUSEPORT) and the "
           "spool; more than 1 uses more cores (see docs/operations.md). Restart to change.")

    @property
    def host_port(self) -> tuple[str, int]:
        return split_listen(self.listen)


def _own_schema(name: str) -> str:
    # PostgreSQL cuts a name at 63 bytes, not characters: two long names could be one schema
    # (two relays "apart" sharing every table); and its own schemas are not the relay's
    if len(name.encode()) > 63:
        raise ValueError(f"at most 63 bytes in UTF-8, as PostgreSQL keeps them (this one is "
                         f"{len(name.encode())})")
    if name == "information_schema" or name.startswith("pg_"):   # (the name is quoted: exact)
        raise ValueError(f"{name!r} is PostgreSQL's own (pg_ is reserved); give the relay a "
                         "schema of its own")
    return name


class PostgresConfig(_Model):
    """The PostgreSQL spool (spool.backend: postgres), shared by several relays."""

    dsn: OptionalSecret = _d(
        None, "postgresql://user:password@host/db (or dsn_file); required for this backend "
              "(an empty value counts as none).")
    schema_: Annotated[str, Field(alias="schema", min_length=1), AfterValidator(_own_schema)] = _d(
        "relay", "Schema holding the relay's tables.")
    pool_size: Annotated[int, NOT_BOOL, Field(ge=3, le=1000)] = _d(
        10, "Connections per relay (at least 3): 2 of them take delivery claims and attempt "
            "outcomes, the rest ingest and reads (under large batches a second ingest group "
            "may take one of those, when two are free).")
    lease: PositiveDuration | None = _d(
        None, "How long a claimed delivery stays with its relay; default delivery.timeout + 30s.")


class SpoolConfig(_Model):
    """The durable store of events and deliveries."""

    backend: Literal["sqlite", "postgres"] = _d(
        "sqlite", "sqlite: a local file, one relay per file; postgres: shared by replicas. "
                  "Restart to change.")
    path: Annotated[FilePath, Field(min_length=1)] = _d(
        "./relay-spool.db", "SQLite file (WAL mode; -wal, -shm and .lock beside it). A relative "
                            "path is relative to the config file's folder. Restart to change.")
    postgres: PostgresConfig = _d(PostgresConfig(), "Settings of the postgres backend. "
                                                    "Restart to change.")
    max_events: Annotated[int, NOT_BOOL, Field(ge=1)] = _d(
        1_000_000, "Events awaiting delivery before ingest answers 503.")
    max_bytes: Annotated[int, NOT_BOOL, Field(ge=0)] = _d(
        0, "SQLite file bytes in use (free pages not counted) at which ingest answers 503; 0: "
           "no bound. Keep it below the volume's size (the Helm chart does). Not for the "
           "postgres backend.")
    retention: Duration = _d(
        7 * 86400.0, "Finished events, their activity log and the dead letter are kept this long.")
    dedupe_window: Duration = _d(
        86400.0, "A repeated event id within this is a duplicate (answered, not stored again).")


class RateLimit(_Model):
    """A token bucket: ``per_second`` tokens a second, at most ``burst`` saved up."""

    per_second: Annotated[float, NOT_BOOL, Field(ge=0.00001, le=1_000_000)] = Field(
        description="Attempts a second, on average (several replicas: see docs/controls.md); "
                    "at least 0.00001, about one a day (a smaller rate sends one attempt and "
                    "then nothing for years).")
    burst: Annotated[int, NOT_BOOL, Field(ge=1, le=1_000_000)] | None = _d(
        None, "Attempts that may start at once after a quiet spell; default: per_second.")


def _server_name(name: str) -> str:
    # (the handshake encodes it: "a..b" was a TLS traceback at every attempt)
    if not is_host_name(name):
        raise ValueError(f"not a host name (labels of 1-63 letters, digits, - or _ joined by "
                         f"dots) or an IP address (got {name!r})")
    return name


class TlsConfig(_Model):
    """A destination's TLS: a client certificate (mTLS), its own CA bundle and server name.

    File paths, not secrets: they are loaded into an ``ssl.SSLContext`` when the destination is
    compiled (and again when one of them changes, see relay.reload)."""

    cert_file: FilePath | None = _d(None, "PEM client certificate (chain) presented to the "
                                     "destination (mTLS); with key_file.")
    key_file: FilePath | None = _d(None, "PEM private key of cert_file.")
    ca_file: FilePath | None = _d(None, "CA bundle that verifies this destination (instead of "
                                   "delivery.ca_file and the system store).")
    server_name: Annotated[str, AfterValidator(_server_name)] | None = _d(
        None, "TLS server name (SNI) and the name the certificate must hold, when it differs "
              "from the url's host: a host name or IP address.")


def _attempt_timeout(seconds: float) -> float:
    # (a typo such as 90d let a receiver that never answers hold a request slot for months;
    # 0.0001ms timed out every attempt before it was sent)
    if not 0.001 <= seconds <= 3600:
        raise ValueError(f"must be between 1ms and 1h (got {seconds:g}s)")
    return seconds


Timeout = Annotated[PositiveDuration, AfterValidator(_attempt_timeout)]


class DeliveryConfig(_Model):
    """Sending: retries, backoff, the egress bounds, concurrency."""

    timeout: Timeout = _d(90.0, "Per attempt; between 1ms and 1h (no receiver's answer takes "
                                "an hour: a longer one holds a request slot for nothing).")
    max_retries: Annotated[int, NOT_BOOL, Field(ge=0, le=100)] = _d(
        5, "Retries for retryable answers (408, 429, 5xx) within retry_window.")
    retry_window: Duration = _d(1800.0, "Retries of retryable answers stop this long after the "
                                        "first attempt (time held by a suspension not counted).")
    unreachable_window: Duration = _d(
        86400.0, "Retries go on this long while the host cannot be reached at all.")
    backoff_initial: Duration = _d(30.0, "First backoff; it doubles per retry, with ±20% jitter.")
    backoff_max: Duration = _d(600.0, "Longest backoff; also the most a Retry-After is obeyed.")
    allowed_ports: tuple[Port, ...] = _d(
        (80, 443), "Ports any destination may use: the outer bound of every destination's "
                   "allowed_ports.")
    allowed_networks: tuple[str, ...] = _d(
        (), "Internal networks (CIDRs) destinations may reach; loopback, private, link-local, "
            "CGNAT and unique-local addresses are refused unless listed. Restart to change.")
    concurrency: Annotated[int, NOT_BOOL, Field(ge=1, le=10_000)] = _d(
        64, "Requests in flight at most (a request's slot is free once its response is in). "
            "Restart to change.")
    per_host_concurrency: Annotated[int, NOT_BOOL, Field(ge=1, le=10_000)] = _d(
        16, "Requests in flight per host at most (a request's slot is free once its "
            "response is in). Restart to change.")
    ca_file: FilePath | None = _d(
        None, "Extra CA bundle (PEM) for TLS verification. Restart to change.")
    proxy: OptionalSecret = _d(
        None, "Egress proxy for every destination: http://[user:password@]host:port (its "
              "credentials are secrets); see docs/controls.md.")
    rate_limit: RateLimit | None = _d(
        None, "Rate limit of every destination without its own: {per_second, burst}.")


class HealthConfig(_Model):
    """When a host is suspended (its deliveries held) and for how long."""

    window: PositiveDuration = _d(60.0, "The window failures and requests are counted in.")
    min_failures: Annotated[int, NOT_BOOL, Field(ge=1)] = _d(
        20, "Failures in the window before failure_rate can suspend.")
    failure_rate: Annotated[float, NOT_BOOL, Field(gt=0, le=1)] = _d(
        0.9, "Share of failed requests in the window that suspends the host.")
    consecutive_failures: Annotated[int, NOT_BOOL, Field(ge=1)] = _d(
        10, "Failures in a row that suspend the host.")
    suspend_for: PositiveDuration = _d(
        60.0, "First suspension; times the number of suspensions in a row.")
    suspend_max: PositiveDuration = _d(1800.0, "Longest suspension.")


class SandboxConfig(_Model):
    """The AJO sandbox of an ajo destination."""

    id: Annotated[str, Field(min_length=1, description="Sandbox id.")]
    name: Annotated[str, Field(min_length=1, description="Sandbox name.")]


class AjoConfig(_Model):
    """Fields of an ajo destination (required for format ajo)."""

    ims_org: Annotated[str, Field(min_length=1, description="IMS organization id (imsOrg).")]
    sandbox: SandboxConfig = Field(description="{id, name} of the sandbox.")


class NoAuth(_Model):
    """No signature (the default)."""

    type: Literal["none"] = Field(description="Selects this kind of auth.")


class BearerAuth(_Model):
    """Authorization: Bearer <token>."""

    type: Literal["bearer"] = Field(description="Selects this kind of auth.")
    token: Annotated[RequiredSecret, AfterValidator(header_secret)] = Field(
        description="The token (or token_file); no line break or NUL.")


class BasicAuth(_Model):
    """HTTP basic authentication."""

    type: Literal["basic"] = Field(description="Selects this kind of auth.")
    username: Annotated[str, Field(min_length=1), AfterValidator(header_text)] = Field(
        description="User name; no line break or NUL.")
    password: HeaderSecret = Field(description="Password (or password_file); may be empty (an "
                                               "API key as the user name); no line break or "
                                               "NUL.")


def _at_least_a_second(ttl: float) -> float:
    if ttl < 1:  # iat and exp are whole seconds: a shorter ttl gives exp == iat
        raise ValueError(f"must be at least 1s: a JWT's iat and exp are whole seconds "
                         f"(got {ttl * 1000:g}ms)")
    return ttl


class JwtAuth(_Model):
    """A JWT signed per request (reused until 60 s before it expires)."""

    type: Literal["jwt"] = Field(description="Selects this kind of auth.")
    algorithm: Literal[
        "HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
        "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA",
    ] = _d("HS256", "Signing algorithm.")
    key: RequiredSecret = Field(description="HMAC secret or PEM private key (or key_file).")
    issuer: str | None = _d(None, "Claim iss.")
    subject: str | None = _d(None, "Claim sub.")
    audience: str | None = _d(None, "Claim aud.")
    ttl: Annotated[PositiveDuration, AfterValidator(_at_least_a_second)] = _d(
        300.0, "exp = iat + ttl; at least 1s.")
    reuse: bool = _d(True, "Reuse a token until shortly before it expires; false: a fresh "
                           "token (new jti, iat) per request, for receivers that reject replays.")
    claims: Annotated[dict[str, Any], AfterValidator(json_claims)] = _d(dict, "Extra claims.")
    header: AuthHeader = _d("Authorization", "Header the token is sent in; not one the "
                                             "relay sets (Content-Type, User-Agent, Webhook-Id...).")
    scheme: HeaderValue = _d("Bearer", "Prefix of the header value; \"\" sends the bare token.")
    key_id: str | None = _d(None, "JWT header kid.")


class HmacAuth(_Model):
    """Standard Webhooks signature headers (webhook-id, webhook-timestamp, webhook-signature)."""

    type: Literal["hmac"] = Field(description="Selects this kind of auth.")
    secret: SecretStr | None = _d(
        None, "whsec_<base64> (or secret_file); the key, base64-decoded, at least 16 bytes: "
              "Standard Webhooks secrets are 24 to 64 random bytes, and a few bytes can be "
              "guessed by trying them ('whsec_' + `openssl rand -base64 32` makes one).")
    secrets: tuple[SecretStr, ...] = _d((), "Several during rotation: each signs, and each "
                                            "is held to secret's rules.")


def _token_url(url: str) -> str:
    # (refused here, before any message could repeat it: the password would be shown in
    # errors and relay test output; the URL's other rules are relay.config.checks' and
    # relay.oauth2.token_url_problems')
    try:
        userinfo = "@" in urlsplit(url).netloc
    except ValueError:
        userinfo = "@" in url
    if userinfo:
        raise ValueError("must not carry userinfo (user:password@): it would be shown in "
                         "errors and relay test output; the client's credentials are "
                         "client_id and client_secret")
    return url


class OAuth2Auth(_Model):
    """OAuth 2.0 client credentials (RFC 6749 section 4.4)."""

    type: Literal["oauth2"] = Field(description="Selects this kind of auth.")
    token_url: Annotated[str, Field(min_length=1), AfterValidator(_token_url)] = Field(
        description="Token endpoint (client credentials grant): no userinfo; its port in "
                    "delivery.allowed_ports, an internal IP literal in "
                    "delivery.allowed_networks.")
    client_id: Annotated[str, Field(min_length=1)] = Field(description="The client id.")
    client_secret: RequiredSecret = Field(
        description="The client secret (or client_secret_file).")
    scope: str | None = _d(None, "Space-separated scopes asked for.")
    audience: str | None = _d(None, "Sent as the audience form field (Auth0, Okta...).")
    header: AuthHeader = _d("Authorization", "Header that carries the access token; not one "
                                             "the relay sets (Content-Type, User-Agent, "
                                             "Webhook-Id...).")
    scheme: HeaderValue = _d("Bearer", "Word before the token; \"\" sends the bare token.")


Auth = Annotated[NoAuth | BearerAuth | BasicAuth | JwtAuth | HmacAuth | OAuth2Auth,
                 Field(discriminator="type")]


class JsonBody(_Model):
    """A JSON object body whose values are templates."""

    type: Literal["json"] = Field(description="Selects this kind of body.")
    fields: dict[str, str] = _d(dict, "Key -> Liquid template of its (string) value.")


class RawBody(_Model):
    """A body rendered from one template."""

    type: Literal["raw"] = Field(description="Selects this kind of body.")
    template: str = _d("", "Liquid template of the whole body.")
    content_type: HeaderValue = _d("text/plain; charset=utf-8", "Content-Type sent; no line break or NUL.")


Body = Annotated[JsonBody | RawBody, Field(discriminator="type")]


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _method_upper_case(value: Any) -> Any:
    # RFC 9110 methods are case-sensitive, but `method: post` always means POST, and POST is
    # what the receiver expects: stored upper-cased, not refused. (Anything else is refused
    # as written; ASCII only: "po\u017ft".upper() is "POST".)
    if isinstance(value, str) and value.isascii() and value.upper() in METHODS:
        return value.upper()
    return value


Method = Annotated[Literal["GET", "POST", "PUT", "PATCH", "DELETE"],
                   BeforeValidator(_method_upper_case)]


# A BCP 47 language tag as events carry it (``fr``, ``fr-CA``, ``zh-Hant-TW``), or a POSIX
# locale's (``pt_BR``): matched without regard to case
LanguageTag = Annotated[str, Field(pattern=r"^[A-Za-z]{2,8}([-_][A-Za-z0-9]{1,8})*$")]


class TemplateVariant(_Model):
    """A per-language override; anything not given comes from the destination's template."""

    url: str | None = _d(None, "Overrides the destination's url.")
    method: Method | None = _d(None, "Overrides template.method.")
    headers: Headers | None = _d(None, "Replaces the destination's headers.")
    body: Body | None = _d(None, "Overrides template.body.")


class TemplateConfig(_Model):
    """The request of a template destination (Braze-compatible Liquid)."""

    method: Method = _d("POST", "HTTP method, in any case (post is sent as POST).")
    body: Body | None = _d(None, "{type: json, fields} or {type: raw, template, content_type}; "
                                 "none: no body (typical for GET/DELETE).")
    variants: Annotated[dict[LanguageTag, TemplateVariant], AfterValidator(one_per_case(
        "language", "tags are matched without regard to case"))] = _d(
        dict, "Per event.language (exact tag, then primary subtag) overrides; tags are "
              "matched without regard to case, so fr and FR cannot both be given.")


class Destination(_Model):
    """One receiver and the shape of what it gets."""

    name: Name = Field(description="Unique name (letters, digits, . _ -); used in metrics and "
                                   "the API.")
    format: Format = Field(description="ajo, braze or template.")
    url: Annotated[str, Field(min_length=1)] = Field(
        description="Where to send; a template destination's url may use Liquid.")
    channels: Annotated[tuple[Channel, ...], Field(min_length=1)] = _d(
        CHANNELS, "Channels of the events this destination takes.")
    statuses: Annotated[tuple[Status, ...], Field(min_length=1)] | None = _d(
        None, "Statuses that create a delivery; none: every status the format can express.")
    ajo: AjoConfig | None = _d(None, "Required for format ajo.")
    allow_insecure_http: bool = _d(False, "Let an ajo destination use http:// (local tests).")
    auth: Auth = _d(NoAuth(type="none"), "Request signing: type none, bearer, basic, jwt, hmac "
                                         "or oauth2.")
    headers: Headers = _d(dict, "Extra headers (values may be Liquid in template "
                                "destinations); not Host, Content-Length, Transfer-Encoding or "
                                "Connection, nor one the relay sets: Webhook-Id, User-Agent, "
                                "the auth type's own (Authorization for bearer and basic). "
                                "Names are compared without regard to case: X-Env and x-env "
                                "cannot both be given.")
    allowed_hosts: tuple[Annotated[str, AfterValidator(allowed_host)], ...] | None = _d(
        None, "template: \"host\" or \"host:port\" a rendered URL may reach (default: the url's "
              "host); no scheme, path or wildcard. Required, and not empty, when the url's "
              "host is a template.")
    allowed_ports: tuple[Port, ...] | None = _d(
        None, "Ports of this destination (default: the url's own port); within "
              "delivery.allowed_ports.")
    template: TemplateConfig | None = _d(None, "Required for format template.")
    timeout: Timeout | None = _d(None, "Overrides delivery.timeout; between 1ms and 1h.")
    max_retries: Annotated[int, NOT_BOOL, Field(ge=0, le=100)] | None = _d(
        None, "Overrides delivery.max_retries.")
    retry_window: Duration | None = _d(None, "Overrides delivery.retry_window.")
    unreachable_window: Duration | None = _d(None, "Overrides delivery.unreachable_window.")
    backoff_initial: Duration | None = _d(None, "Overrides delivery.backoff_initial.")
    backoff_max: Duration | None = _d(None, "Overrides delivery.backoff_max.")
    rate_limit: RateLimit | None = _d(
        None, "Token bucket {per_second, burst}; none: delivery.rate_limit (none: unlimited).")
    tls: TlsConfig | None = _d(
        None, "TLS of this destination: cert_file and key_file (mTLS), ca_file, server_name.")
    proxy: OptionalSecret = _d(
        None, "Egress proxy http://[user:password@]host:port; none: delivery.proxy; \"direct\": "
              "no proxy.")


class Config(_Model):
    """The whole file."""

    server: ServerConfig = _d(ServerConfig(), "The local HTTP API.")
    spool: SpoolConfig = _d(SpoolConfig(), "The durable store.")
    delivery: DeliveryConfig = _d(DeliveryConfig(), "Sending and retries.")
    health: HealthConfig = _d(HealthConfig(), "Host suspension.")
    # At most MAX_DESTINATIONS: an event's delivery ids tell its deliveries apart in 16 bits.
    destinations: Annotated[tuple[Destination, ...], Field(max_length=MAX_DESTINATIONS)] = _d(
        (), "The receivers; each event goes to every destination whose channels and statuses "
            "match. At most 65,536.")
    source: str = Field(default="config", exclude=True)  # file the config came from

    def longest_timeout(self) -> float:
        """The longest attempt any destination may make (delivery.timeout, or a
        destination's own): a PostgreSQL lease must outlast it."""
        return max([self.delivery.timeout,
                    *(d.timeout for d in self.destinations if d.timeout is not None)])

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ("127.0.0.1", 8080); ``"[::1]:8080"`` -> ("::1", 8080)."""
    host, sep, port = listen.rpartition(":")
    # (ASCII digits: str.isdigit takes '²' and other scripts' digits, which int() refuses or
    # reads; a scheme or a path is not an address)
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535 \
            or "/" in host or " " in listen:
        raise ValueError(f"expected host:port such as 127.0.0.1:8080 (got {listen!r})")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
