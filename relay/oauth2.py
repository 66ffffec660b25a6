"""OAuth 2.0 client credentials (RFC 6749 section 4.4): fetch, cache and refresh access tokens.

One ``TokenProvider`` per destination with ``auth: {type: oauth2, ...}``. The token is fetched
from ``token_url`` through the relay's own transport (so the egress rules apply to it too),
cached (cachetools, per token) until ``REFRESH_MARGIN`` before it expires, fetched once for any
number of concurrent attempts, and dropped when the destination answers 401 with it
(``invalidate``) so the next ``token()`` fetches a new one. A token endpoint that fails raises
``TokenError``: the attempt is a retryable failure saying why. Never logs or shows a secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple
from urllib.parse import quote, urlencode

import cachetools

from relay.config import OAuth2Auth
from relay.redact import hide
from relay.request import Exchange, Request

REFRESH_MARGIN = 30.0     # seconds before expiry at which a cached token is replaced
DEFAULT_LIFETIME = 300.0  # when the endpoint gives no expires_in
TOKEN_TIMEOUT = 30.0      # seconds for one token request
TOKEN_BYTES = 65536       # of a token response read at most

Fetch = Callable[[Request, float, int], Awaitable[Exchange]]  # request, timeout, bytes to read


class TokenError(Exception):
    """The token endpoint could not give a token; the message says why (no secrets)."""


class _Token(NamedTuple):
    value: str
    expires_at: float


class TokenProvider:
    """Access tokens of one destination's client credentials."""

    def __init__(self, auth: OAuth2Auth, clock: Callable[[], float] = time.time) -> None:
        self.auth = auth
        self.clock = clock
        self.fetches = 0   # token requests made (for tests and the curious)
        self._cache: cachetools.TLRUCache[str, _Token] = cachetools.TLRUCache(
            maxsize=1, ttu=lambda _key, token, _now: token.expires_at - self._margin(token),
            timer=clock)
        self._lock = asyncio.Lock()

    def _margin(self, token: _Token) -> float:
        return min(REFRESH_MARGIN, max(0.0, (token.expires_at - self.clock()) / 2))

    async def token(self, fetch: Fetch) -> str:
        """A valid access token: the cached one, or one fetched now (once for all callers)."""
        cached = self._cache.get("token")
        if cached is not None:
            return cached.value
        async with self._lock:  # the first caller fetches; the others find its token
            cached = self._cache.get("token")
            if cached is not None:
                return cached.value
            token = await self._fetch(fetch)
            self._cache["token"] = token
            return token.value

    def invalidate(self, value: str) -> None:
        """The destination refused ``value`` (401): fetch a new one next time (unless another
        attempt has already replaced it)."""
        cached = self._cache.get("token")
        if cached is not None and cached.value == value:
            del self._cache["token"]

    def request(self) -> Request:
        """The token request: client_secret_basic (RFC 6749 section 2.3.1), and the client id
        in the form too, for servers that read it there."""
        form = {"grant_type": "client_credentials", "client_id": self.auth.client_id}
        if self.auth.scope:
            form["scope"] = self.auth.scope
        if self.auth.audience:
            form["audience"] = self.auth.audience
        pair = f"{quote(self.auth.client_id, safe='')}:" \
               f"{quote(self.auth.client_secret.get_secret_value(), safe='')}"
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Accept": "application/json",
                   "Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        return Request("POST", self.auth.token_url, headers, urlencode(form).encode())

    async def _fetch(self, fetch: Fetch) -> _Token:
        self.fetches += 1
        where = f"token endpoint {self.auth.token_url}"
        request = self.request()
        exchange = await fetch(request, TOKEN_TIMEOUT, TOKEN_BYTES)
        if exchange.status is None:
            raise TokenError(f"{where} not reached: {exchange.error_text}")
        if exchange.status != 200:
            # (the error is kept with the attempt and logged: an endpoint that echoes the
            # request must not put the client's credentials there)
            credentials = sorted((request.headers["Authorization"].partition(" ")[2],
                                  self.auth.client_secret.get_secret_value()),
                                 key=len, reverse=True)
            excerpt = hide(exchange.excerpt or "", credentials)[:200]
            raise TokenError(f"{where} answered {exchange.status}: {excerpt}")
        try:
            data = json.loads(exchange.excerpt or "")
            value = data["access_token"]
            lifetime = float(data.get("expires_in") or DEFAULT_LIFETIME)
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenError(f"{where} answered 200 without a JSON access_token "
                             f"({type(exc).__name__})") from exc
        if not isinstance(value, str) or not value:
            raise TokenError(f"{where} answered an empty access_token")
        return _Token(value, self.clock() + lifetime)

    def header(self, value: str) -> dict[str, str]:
        scheme = self.auth.scheme
        return {self.auth.header: f"{scheme} {value}" if scheme else value}
