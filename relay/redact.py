"""Hiding a destination's secrets in what its receiver answered.

A receiver that echoes the request (many test endpoints do) puts the credentials the relay sent
into its answer: the test send shows that answer, and the activity log keeps the first 1 KiB
of every answer (a secret cut there is hidden too). Only secret material is looked for, by value,
as written and JSON-escaped (``\\/``, ``\\"``, ``\\uXXXX``): the destination's auth secrets;
what the relay computed from them for a request (Basic's base64, a JWT, HMAC signatures, an
OAuth2 token: relay.sending hides that one); and the values of configured headers and query
parameters that ``is_credential`` says are secret. Any other value a receiver echoes (an
``X-Env: production`` header) stays readable. Never changes what is sent, nor a status.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from multidict import CIMultiDict

from relay.auth import MASKED, SCHEMES, auth_secrets
from relay.config import Destination, HmacAuth, JwtAuth
from relay.request import Exchange, Request, has_markup

ECHO_MIN = 4   # a shorter secret is not looked for (it would hide common text)
# A response's excerpt is its first 1 KiB (relay.transport.EXCERPT_BYTES): one cut there has
# at least this many characters (4 UTF-8 bytes each at most), a shorter text was not cut.
CUT_MIN = 256

# Names of headers and query parameters that hold credentials: X-Api-Key, X-Auth-Token,
# X-Hub-Signature, Cookie, ?api_key=, ?access_token=, ?sig= (Azure SAS), ?code= (Azure
# Functions).
CREDENTIAL_NAME = re.compile(
    r"auth(?!ors?(?![a-z]))|key|token|secret|passw|passphrase|signature|hmac|session|cookie|credential"
    r"|jwt|private|(?<![a-z])(sig|code|pass|pwd|pw)(?![a-z])", re.IGNORECASE)


def is_credential(name: str, value: str) -> bool:
    """A configured header (or query parameter) whose value is a secret: its name says so, or
    the value starts with a scheme word (``Bearer ...``, ``Basic ...``, ``Token ...``)."""
    return CREDENTIAL_NAME.search(name) is not None or value.partition(" ")[0] in SCHEMES


def secret_parts(value: str) -> tuple[str, ...]:
    """The secrets in a secret header value, so that an echo of it reads as ``relay render``
    shows the header: each HMAC signature after its version (``v1,****``), the credential
    after a scheme word (``Bearer ****``; a short one with its scheme), else the whole."""
    if value.startswith("v1,"):   # "v1,<sig> v1,<sig>"
        return tuple(value[3:].split(" v1,"))
    scheme, _, rest = value.partition(" ")
    return (rest,) if scheme in SCHEMES and len(rest) >= ECHO_MIN else (value,)


def escaped_forms(secret: str) -> set[str]:
    """How a JSON string holds ``secret``, where that differs from ``secret``: ``"`` and ``\\``
    escaped, ``/`` as ``\\/`` (as PHP and others write it), non-ASCII as ``\\uXXXX`` or not."""
    if secret.isascii() and secret.isprintable() and '"' not in secret and "\\" not in secret:
        forms = {secret.replace("/", "\\/")}   # (the common case, without json.dumps)
    else:
        forms = {json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
        forms |= {form.replace("/", "\\/") for form in forms}
    forms.discard(secret)
    return forms


def _longest_first(secrets: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({s for s in secrets if len(s) >= ECHO_MIN}, key=len, reverse=True))


def _replace(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if len(secret) >= ECHO_MIN and secret in text:
            text = text.replace(secret, MASKED)
    return text


def _hide_cut(text: str, secrets: Iterable[str]) -> str:
    """``text`` with the start of a secret it ends with (``ECHO_MIN`` characters or more)
    hidden: a response's excerpt is cut at 1 KiB, maybe inside an echoed secret."""
    if len(text) < CUT_MIN:
        return text
    cut = len(text)
    for secret in secrets:
        if len(secret) < ECHO_MIN:
            continue
        at = text.find(secret[:ECHO_MIN], max(0, len(text) - len(secret) + 1))
        while at != -1 and at < cut:
            if secret.startswith(text[at:]):
                cut = at
                break
            at = text.find(secret[:ECHO_MIN], at + 1)
    return text if cut == len(text) else text[:cut] + MASKED


def hide(text: str, secrets: Sequence[str], escaped: Sequence[str] | None = None) -> str:
    """``text`` with each of ``secrets`` (in the order given: longest first, so a secret that
    contains another is hidden whole), as written and JSON-escaped (``escaped``, when the
    caller has those forms already), and the start of one it ends with, replaced by
    ``****``; ``text`` itself when none is in it. Secrets shorter than ``ECHO_MIN`` are left
    alone."""
    if "\\" in text:   # else no escaped form can be in it
        if escaped is None:
            escaped = [form for secret in secrets for form in escaped_forms(secret)]
        text = _replace(text, escaped)
    return _hide_cut(_replace(text, secrets), secrets)


def hide_in(exchange: Exchange, secrets: Sequence[str]) -> Exchange:
    """``exchange`` with ``secrets`` hidden in its response headers and body excerpt (the
    same object when none was echoed); header names still compare case-insensitively."""
    excerpt = hide(exchange.excerpt, secrets) if exchange.excerpt else exchange.excerpt
    headers = exchange.headers
    if any(hide(value, secrets) is not value for value in headers.values()):
        headers = CIMultiDict((name, hide(value, secrets)) for name, value in headers.items())
    if excerpt is exchange.excerpt and headers is exchange.headers:
        return exchange
    return dataclasses.replace(exchange, headers=headers, excerpt=excerpt)


def credentials(dest: Destination) -> tuple[list[str], list[str]]:
    """A destination's configured secrets, whatever their length: its ``auth_secrets``, and
    the literal values (``secret_parts``) of the headers and query parameters ``is_credential``
    names; and the names of credential headers rendered from event data (read from each
    request)."""
    found, rendered = auth_secrets(dest), []
    template = dest.template
    variants = list(template.variants.values()) if template is not None else []
    for headers in [dest.headers] + [v.headers for v in variants if v.headers]:
        for name, value in headers.items():
            if not is_credential(name, value):
                continue
            if has_markup(value):
                rendered.append(name)
            else:
                found += secret_parts(value)
    for url in [dest.url] + [v.url for v in variants if v.url]:
        # (the query alone: urlsplit refuses a netloc with brackets, which a templated host
        # such as {{ event.attributes['region'] }} has)
        query = url.partition("?")[2].partition("#")[0]
        found += [value for name, value in parse_qsl(query)
                  if is_credential(name, value) and not has_markup(value)]
    return [s for s in found if s], rendered


@dataclass(frozen=True, slots=True)
class Echoes:
    """One destination's secrets as its receiver may echo them back: built once per
    destination (relay.destinations), looked for in each answer shown or kept."""

    static: tuple[str, ...] = ()    # the configured secrets, longest first
    escaped: tuple[str, ...] = ()   # their JSON-escaped forms, longest first
    signed: tuple[str, ...] = ()    # headers whose secret value is made per request

    @classmethod
    def of(cls, dest: Destination) -> Echoes:
        found, rendered = credentials(dest)
        signed = [dest.auth.header] if isinstance(dest.auth, JwtAuth) else \
            ["webhook-signature"] if isinstance(dest.auth, HmacAuth) else []
        static = _longest_first(found)
        return cls(static, _longest_first(form for s in static for form in escaped_forms(s)),
                   tuple(dict.fromkeys(signed + rendered)))

    def hide(self, text: str, request: Request | None = None) -> str:
        """``text`` (a response body or header value) with this destination's secrets hidden,
        and those ``request`` (as sent) carried in its per-request headers."""
        if len(text) < ECHO_MIN or not (self.static or self.signed):   # ("ok", "{}")
            return text
        if request is not None:
            for name in self.signed:
                value = request.headers.get(name)
                if value:
                    text = hide(text, secret_parts(value))
        return hide(text, self.static, self.escaped)
