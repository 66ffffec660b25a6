"""The HTTP send, behind a one-method seam: ``Transport.handle_request(request, timeout)``.

A transport makes one attempt and reports what happened as an ``Exchange`` (a response, or an
error class for a timeout, a refused connection, a TLS failure...). It never judges the result
(that is ``relay.policy.classify``), never retries, never follows redirects and never raises for
network trouble. ``AiohttpTransport`` is the real one; tests may pass their own.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
from cachetools import LRUCache
from yarl import URL

from relay.config import Config
from relay.egress import Blocked, GuardedResolver, blocked_cause, check_literal, parse_networks
from relay.request import Exchange, Request

EXCERPT_BYTES = 1024  # of each response body, kept for the activity log
URL_CACHE = 1024  # parsed and egress-checked URLs kept per transport (templated URLs vary)


@functools.lru_cache(maxsize=64)  # one per destination timeout (and token endpoint): few
def _client_timeout(total: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total)   # immutable: shared by every attempt


class Transport(Protocol):
    async def handle_request(self, request: Request, timeout: float,
                             read_limit: int = EXCERPT_BYTES) -> Exchange:
        """Make one attempt; network trouble is an ``Exchange`` with ``error`` set.
        ``read_limit``: bytes of the response body kept (an OAuth2 token response needs more
        than the activity log's excerpt)."""
        ...


def client_session(config: Config) -> aiohttp.ClientSession:
    """One shared session: pooled keep-alive connections, TLS verified, no cookies, and only
    the addresses relay.egress allows (a name that resolves to an internal address is
    refused unless delivery.allowed_networks holds it)."""
    context = ssl.create_default_context(cafile=config.delivery.ca_file)
    resolver = GuardedResolver(parse_networks(config.delivery.allowed_networks))
    connector = aiohttp.TCPConnector(limit=config.delivery.concurrency,
                                     limit_per_host=config.delivery.per_host_concurrency,
                                     ssl=context, ttl_dns_cache=60, resolver=resolver)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                 auto_decompress=True)


class AiohttpTransport:
    """Sends with one pooled aiohttp session, made on first use (it needs a running loop)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._allowed = parse_networks(config.delivery.allowed_networks)
        self._session: aiohttp.ClientSession | None = None
        # url -> the parsed URL, or the Exchange error and detail that refuse it: both depend
        # only on the string and allowed_networks (fixed for this transport's life).
        self._urls: LRUCache[str, URL | tuple[str, str]] = LRUCache(URL_CACHE)

    def _checked(self, url: str) -> URL | tuple[str, str]:
        """``url`` parsed, or why it may not be sent: ``(error, detail)``. aiohttp connects to
        an IP literal without asking the resolver, so a literal is checked here."""
        verdict = self._urls.get(url)
        if verdict is None:
            try:
                parsed = URL(url)
                check_literal(parsed.host or "", self._allowed)
                verdict = parsed
            except Blocked as exc:
                verdict = ("blocked", str(exc))
            except ValueError as exc:
                verdict = ("invalid_url", str(exc))
            self._urls[url] = verdict
        return verdict

    async def handle_request(self, request: Request, timeout: float,
                             read_limit: int = EXCERPT_BYTES) -> Exchange:
        if self._session is None:
            self._session = client_session(self.config)
        started, t0 = self.clock(), time.monotonic()
        via = request.via
        options: dict[str, Any] = {}
        # The proxy's literal too: behind a proxy the destination's name is resolved by the proxy.
        url = self._checked(request.url)
        proxy = self._checked(via.proxy.url) if via is not None and via.proxy is not None else None
        for refused in (url, proxy):
            if isinstance(refused, tuple):
                return Exchange(started, 0.0, error=refused[0], detail=refused[1])
        assert isinstance(url, URL)
        if via is not None:
            if via.ssl is not None:
                options["ssl"] = via.ssl
            if via.server_name:
                options["server_hostname"] = via.server_name
            if via.proxy is not None:
                options["proxy"] = via.proxy.url
                if via.proxy.username is not None:  # Basic, on the CONNECT (or proxied) request
                    pair = f"{via.proxy.username}:{via.proxy.password or ''}".encode()
                    options["proxy_headers"] = {
                        "Proxy-Authorization": "Basic " + base64.b64encode(pair).decode()}
        try:
            # The URL as parsed and egress-checked above, and one shared ClientTimeout per
            # value: neither is built again per attempt.
            async with self._session.request(
                    request.method, url, headers=request.headers,
                    data=request.body or None, allow_redirects=False,
                    timeout=_client_timeout(timeout), **options) as resp:
                raw = await resp.content.read(read_limit)
                return Exchange(started, time.monotonic() - t0, resp.status, resp.headers,
                                raw.decode("utf-8", errors="replace"))
        except Exception as exc:
            error, detail = error_class(exc, timeout)
            _drop_tracebacks(exc)
            return Exchange(started, time.monotonic() - t0, error=error, detail=detail)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _drop_tracebacks(exc: BaseException) -> None:
    """Cut a failed attempt's exceptions (and their causes) from their frames. aiohttp's frames
    hold the exception they raised, so exception, traceback and frames form a cycle that keeps
    the request and its body alive until the collector runs (every 10,000 allocations while
    serving: relay/service.py); cut, they are freed at once. Only the error class and its
    detail sentence outlive the attempt."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        one = todo.pop()
        if one is None or id(one) in seen:
            continue
        seen.add(id(one))
        one.__traceback__ = None
        todo += [one.__cause__, one.__context__]


def error_class(exc: BaseException, timeout: float) -> tuple[str, str]:
    """aiohttp's exception zoo -> the error classes of relay.policy, with a detail sentence."""
    detail = str(exc) or type(exc).__name__
    blocked = blocked_cause(exc)
    if blocked is not None:
        return "blocked", str(blocked)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_timeout", f"no connection within {timeout:g}s"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout", f"no response within {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "tls", detail
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return "proxy", f"the proxy refused the tunnel: {exc.status} {exc.message}"
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", None)
    if dns_error is not None and isinstance(exc, dns_error):
        return "dns", detail
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect", detail
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected", "the server closed the connection without answering"
    if isinstance(exc, aiohttp.ClientOSError | aiohttp.ClientPayloadError | ConnectionError):
        return "reset", detail
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid_url", detail
    return "client_error", f"{type(exc).__name__}: {detail}"
