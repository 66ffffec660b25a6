"""Signing: a ``Request -> Request`` step that adds authentication and the relay's own headers.

It knows nothing of payload formats. Every request gets ``Webhook-Id`` (the delivery id, stable
across retries) and ``User-Agent``; then, by ``auth.type``: ``bearer``, ``basic``, ``jwt``
(pyjwt; tokens cached with cachetools until 60 s before they expire, or one per request with
``auth.reuse: false``; the key is checked at load by type, curve and size and by signing once)
or ``hmac`` (Standard
Webhooks: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64>`` over
``id.timestamp.body``; one signature per secret while rotating). ``mask`` hides secrets for
display: every header value not on the short ``PUBLIC_HEADERS`` list, and configured query
values (``destination_secrets`` lists a destination's secret values, for logs too).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Callable, Iterable
from urllib.parse import unquote_plus

import cachetools
import jwt

from relay import __version__
from relay.config import BasicAuth, BearerAuth, Destination, HmacAuth, JwtAuth, OAuth2Auth
from relay.config.fields import FRAMING_HEADERS
from relay.errors import ConfigError
from relay.request import Request, has_markup, host_is_rendered, merge_headers

USER_AGENT = f"relay/{__version__} (+webhook relay)"
JWT_REFRESH_MARGIN = 60.0  # seconds before exp at which a cached token is replaced


class Signing:
    """Common headers plus the destination's auth; build once per destination."""

    def __init__(self, dest: Destination, clock: Callable[[], float] = time.time,
                 on_mint: Callable[[], None] | None = None) -> None:
        self.destination = dest
        self.clock = clock
        self._static = {"User-Agent": USER_AGENT, **_static_auth(dest)}
        # the names these replace in a rendered request's headers, compared case-insensitively
        self._replaced = frozenset(name.lower() for name in ("Webhook-Id", *self._static))
        self._auth = _auth_step(dest, clock, on_mint)

    def sign(self, request: Request, delivery_id: str) -> Request:
        # (Request.with_headers, with the lower-cased names made once per destination)
        headers = merge_headers(request.headers, {"Webhook-Id": delivery_id, **self._static},
                                self._replaced)
        request = Request(request.method, request.url, headers, request.body, request.via)
        return self._auth(request, delivery_id) if self._auth else request


def header_owners(dest: Destination) -> dict[str, str]:
    """Each header ``Signing`` writes over a configured one (lower-cased name -> what sets
    it), and the framing headers, which no configuration may set."""
    owners = {name.lower(): "the HTTP client (from the url and body)" for name in FRAMING_HEADERS
              if name != "Host"}   # (a fixed Host beside a fixed url: see header_problems)
    owners["webhook-id"] = "the relay (Webhook-Id is the delivery id)"
    owners["user-agent"] = "the relay (User-Agent is relay/<version>)"
    auth = dest.auth
    if isinstance(auth, BearerAuth | BasicAuth):
        owners["authorization"] = f"auth (type {auth.type})"
    elif isinstance(auth, JwtAuth | OAuth2Auth):
        owners[auth.header.lower()] = f"auth (type {auth.type}; its auth.header)"
    elif isinstance(auth, HmacAuth):
        owners.update(dict.fromkeys(("webhook-timestamp", "webhook-signature"), "auth (type hmac)"))
    return owners


def header_problems(dest: Destination) -> list[tuple[str, str]]:
    """Configured headers (the destination's, its language variants') that the relay sets
    itself: each would be replaced silently, or (framing ones) contradict the request."""
    owners = header_owners(dest)
    variants = dest.template.variants.items() if dest.template is not None else ()
    # A fixed Host beside a fixed url names the virtual host at that address (an IP url and
    # its Host: a pattern that works); one rendered from event data, or beside a rendered
    # url host, would pick a virtual host that allowed_hosts does not name.
    rendered_hosts = any(host_is_rendered(url) for url in
                         [dest.url, *(v.url for _, v in variants if v.url is not None)])
    problems = []
    for at, headers in [("headers", dest.headers)] + [
            (f"template.variants.{lang}.headers", v.headers or {}) for lang, v in variants]:
        for name, value in headers.items():
            owner = owners.get(name.lower())
            if owner is not None:
                problems.append((f"{at}.{name}", f"{name} is set by {owner}: a configured "
                                                 "value would be replaced or break the request; "
                                                 "remove it"))
            elif name.lower() == "host" and (rendered_hosts or has_markup(value)):
                problems.append((f"{at}.{name}", "a Host header may be set only as fixed text "
                                                 "beside a url whose host is fixed: rendered, it "
                                                 "would reach a virtual host that allowed_hosts "
                                                 "does not name"))
    return problems


def _static_auth(dest: Destination) -> dict[str, str]:
    """Auth headers that never change (bearer, basic): merged with the common ones at once."""
    auth = dest.auth
    if isinstance(auth, BearerAuth):
        return {"Authorization": f"Bearer {auth.token.get_secret_value()}"}
    if isinstance(auth, BasicAuth):
        pair = f"{auth.username}:{auth.password.get_secret_value()}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    return {}


def _auth_step(dest: Destination, clock: Callable[[], float],
               on_mint: Callable[[], None] | None = None,
               ) -> Callable[[Request, str], Request] | None:
    """The per-request auth step (JWT from its cache, HMAC over the body), if any."""
    auth = dest.auth
    if isinstance(auth, JwtAuth):
        return JwtSigner(auth, clock, on_mint).sign
    if isinstance(auth, HmacAuth):
        return HmacSigner(auth, clock).sign
    return None


class JwtSigner:
    """Mints a JWT with iss/sub/aud/iat/exp/jti and custom claims; reuses it until near exp,
    or mints one per request with ``auth.reuse: false``."""

    def __init__(self, auth: JwtAuth, clock: Callable[[], float] = time.time,
                 on_mint: Callable[[], None] | None = None) -> None:
        self.auth = auth
        self.clock = clock
        self._on_mint = on_mint
        self._key = signing_key(auth.algorithm, auth.key.get_secret_value())
        reuse = max(auth.ttl - JWT_REFRESH_MARGIN, auth.ttl / 2)
        self._cache: cachetools.TTLCache[str, str] | None = (
            cachetools.TTLCache(1, reuse, timer=clock) if auth.reuse else None)

    def token(self) -> str:
        if self._cache is None:
            return self._mint()
        token = self._cache.get("token")
        if token is None:
            token = self._cache["token"] = self._mint()
        return token

    def _mint(self) -> str:
        now = int(self.clock())
        claims: dict[str, object] = {**self.auth.claims, "iat": now,
                                     "exp": now + int(self.auth.ttl), "jti": uuid.uuid4().hex}
        for claim, value in (("iss", self.auth.issuer), ("sub", self.auth.subject),
                             ("aud", self.auth.audience)):
            if value is not None:
                claims[claim] = value
        headers = {"kid": self.auth.key_id} if self.auth.key_id else None
        if self._on_mint is not None:
            self._on_mint()
        return jwt.encode(claims, self._key, algorithm=self.auth.algorithm,  # type: ignore[arg-type]
                          headers=headers)

    def sign(self, request: Request, delivery_id: str) -> Request:
        scheme = self.auth.scheme
        value = f"{scheme} {self.token()}" if scheme else self.token()
        return request.with_headers(**{self.auth.header: value})


MIN_RSA_BITS = 2048  # NIST SP 800-131A; RFC 7518 3.3 requires it for RS*/PS*
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


def signing_key(algorithm: str, key: str) -> object:
    """The key ``algorithm`` signs with, checked by signing once; ConfigError(``auth.key``)
    with a sentence saying what is wrong and what would be right otherwise."""
    if algorithm.startswith("HS"):
        need = int(algorithm[2:]) // 8  # RFC 7518 3.2: at least the hash size
        if len(key.encode()) < need:
            raise _key_error(f"{algorithm} needs a key of at least {need} bytes "
                             "(RFC 7518 section 3.2)")
        prepared: object = key
    else:
        prepared = _private_key(algorithm, key)
    try:  # the proof: whatever the checks above missed, a key that cannot sign fails here
        jwt.encode({"trial": True}, prepared, algorithm=algorithm)  # type: ignore[arg-type]
    except Exception as exc:  # pyjwt and cryptography raise many kinds
        raise _key_error(f"this key cannot sign {algorithm}: {exc}") from exc
    return prepared


def _private_key(algorithm: str, text: str) -> object:
    """A PEM (or OpenSSH) private key of the kind ``algorithm`` needs."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    data = text.strip().encode()
    want = _wanted(algorithm)
    if b"PUBLIC KEY-----" in data or data.startswith((b"ssh-", b"ecdsa-")) \
            or b"CERTIFICATE-----" in data:
        raise _key_error(f"this is a public key or certificate; {algorithm} signs with the "
                         f"private key: {want} in PEM (-----BEGIN PRIVATE KEY-----)")
    try:
        if b"OPENSSH PRIVATE KEY-----" in data:
            key: object = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise _key_error("this private key is encrypted; give it unencrypted (keep the file "
                         "readable by the relay only)") from exc
    except Exception as exc:  # ValueError, UnsupportedAlgorithm
        raise _key_error(f"not a PEM private key ({exc}); {algorithm} needs {want} in PEM "
                         "(-----BEGIN PRIVATE KEY-----)") from exc
    kind = _describe(key)
    if algorithm[:2] in ("RS", "PS"):
        if not isinstance(key, rsa.RSAPrivateKey):
            raise _key_error(f"{algorithm} needs {want}, not {kind}")
        if key.key_size < MIN_RSA_BITS:
            raise _key_error(f"this RSA key has {key.key_size} bits; {algorithm} needs at "
                             f"least {MIN_RSA_BITS} (RFC 7518 section 3.3)")
    elif algorithm in _EC_CURVES:
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise _key_error(f"{algorithm} needs {want}, not {kind}")
        if key.curve.name != _EC_CURVES[algorithm]:
            raise _key_error(f"{algorithm} needs {want}, not {kind} (RFC 7518 section 3.4)")
    elif algorithm == "EdDSA" and \
            not isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise _key_error(f"EdDSA needs {want}, not {kind}")
    return key


def _wanted(algorithm: str) -> str:
    if algorithm[:2] in ("RS", "PS"):
        return f"an RSA private key of at least {MIN_RSA_BITS} bits"
    if algorithm in _EC_CURVES:
        return f"an EC private key on curve {_EC_CURVES[algorithm]}"
    return "an Ed25519 or Ed448 private key"


def _describe(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on curve {key.curve.name}"
    name = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
    return f"an {name} key" if name[:1] in "AEIOU" else f"a {name} key"


def _key_error(message: str) -> ConfigError:
    return ConfigError([("auth.key", message)])


class HmacSigner:
    """Standard Webhooks signatures (https://www.standardwebhooks.com)."""

    def __init__(self, auth: HmacAuth, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        secrets = ([("auth.secret", auth.secret)] if auth.secret else []) + \
            [(f"auth.secrets[{j}]", s) for j, s in enumerate(auth.secrets)]
        keys: list[bytes] = []
        problems: list[tuple[str, str]] = []   # every bad key named, not only the first
        for where, secret in secrets:
            try:
                keys.append(_whsec_key(secret.get_secret_value(), where))
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(problems)
        self._keys = keys

    def sign(self, request: Request, delivery_id: str) -> Request:
        timestamp = str(int(self.clock()))
        signed = f"{delivery_id}.{timestamp}.".encode() + request.body
        signatures = " ".join(
            "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
            for key in self._keys)
        return request.with_headers(**{"webhook-id": delivery_id, "webhook-timestamp": timestamp,
                                       "webhook-signature": signatures})


MIN_HMAC_KEY_BYTES = 16   # (Standard Webhooks secrets are 24 to 64 random bytes)


def _whsec_key(secret: str, where: str = "auth.secret") -> bytes:
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError as exc:
        raise ConfigError([(where, "not valid base64 after 'whsec_'")]) from exc
    if len(key) < MIN_HMAC_KEY_BYTES:
        # (a byte or two can be found by trying them: anyone could sign as the relay)
        raise ConfigError([(where, f"the key is {len(key)} byte{'s' if len(key) > 1 else ''} "
                                   f"once base64-decoded; at least {MIN_HMAC_KEY_BYTES} are "
                                   "needed (Standard Webhooks secrets are 24 to 64 random "
                                   "bytes: 'whsec_' + `openssl rand -base64 32`)")])
    return key


# Headers whose values are never secret and are shown as they are; every other header value
# (X-Braze-Key, X-Auth, anything a destination configures) is masked. Keep this list short:
# a header missing from it is only hidden, one wrongly on it leaks.
PUBLIC_HEADERS = frozenset({
    "accept", "accept-encoding", "content-encoding", "content-length", "content-type",
    "user-agent", "webhook-id", "webhook-timestamp"})
SCHEMES = ("Bearer", "Basic", "Token")   # words before a credential in a header value
MASKED = "****"


def is_public_header(name: str) -> bool:
    return name.lower() in PUBLIC_HEADERS


def auth_secrets(dest: Destination) -> list[str]:
    """A destination's auth secrets (token, password, key, client secret, hmac secrets), and
    basic's ``user:password`` as its Authorization header carries it (base64)."""
    auth = dest.auth
    if isinstance(auth, BearerAuth):
        return [auth.token.get_secret_value()]
    if isinstance(auth, BasicAuth):
        return [auth.password.get_secret_value(),
                _static_auth(dest)["Authorization"].partition(" ")[2]]
    if isinstance(auth, JwtAuth):
        return [auth.key.get_secret_value()]
    if isinstance(auth, OAuth2Auth):
        return [auth.client_secret.get_secret_value()]
    if isinstance(auth, HmacAuth):
        return [s.get_secret_value() for s in ([auth.secret] if auth.secret else [])] + \
            [s.get_secret_value() for s in auth.secrets]
    return []


def destination_secrets(dest: Destination) -> list[str]:
    """Every secret value a destination configures: its ``auth_secrets``, the value of every
    header not on ``PUBLIC_HEADERS`` (and the part after a scheme word such as ``Bearer``),
    and every literal query value of its configured URLs.

    Values containing Liquid markup are left out: what they render to comes from event data
    and is masked by header name (``mask``), not by value.
    """
    found = auth_secrets(dest)
    template = dest.template
    variants = list(template.variants.values()) if template is not None else []
    header_sets = [dest.headers] + [v.headers for v in variants if v.headers]
    for headers in header_sets:
        for name, value in headers.items():
            if is_public_header(name) or has_markup(value):
                continue
            found.append(value)
            scheme, _, rest = value.partition(" ")
            if rest and scheme in SCHEMES:
                found.append(rest)
    for url in [dest.url] + [v.url for v in variants if v.url]:
        found += [value for value in _query_values(url) if value and not has_markup(value)]
    return [s for s in found if s]


def mask(request: Request, secrets: Iterable[str] = ()) -> Request:
    """The request with secrets hidden, for showing to people.

    Every header value not on ``PUBLIC_HEADERS`` becomes ``****`` (scheme words and the
    ``v1,`` of signatures kept); in the URL, every query value equal to one of ``secrets``
    (see ``destination_secrets``) does too.
    """
    headers = {}
    for name, value in request.headers.items():
        if not is_public_header(name):
            scheme, _, rest = value.partition(" ")
            if name.lower() == "webhook-signature":
                value = " ".join(part.split(",", 1)[0] + "," + MASKED for part in value.split())
            elif rest and scheme in SCHEMES:
                value = f"{scheme} {MASKED}"
            else:
                value = MASKED
        headers[name] = value
    return Request(request.method, mask_query(request.url, secrets), headers, request.body)


def mask_query(url: str, secrets: Iterable[str]) -> str:
    """``url`` with each query value that is one of ``secrets`` replaced by ``****``."""
    hidden = set(secrets)
    base, sep, query = url.partition("?")
    if not sep or not hidden:
        return url
    query, hash_, fragment = query.partition("#")
    parts = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and (value in hidden or unquote_plus(value) in hidden):
            value = MASKED
        parts.append(name + eq + value)
    return base + "?" + "&".join(parts) + hash_ + fragment


def _query_values(url: str) -> list[str]:
    _, sep, query = url.partition("?")
    if not sep:
        return []
    query = query.partition("#")[0]
    return [unquote_plus(pair.partition("=")[2]) for pair in query.split("&") if "=" in pair]

