"""The listening side of the HTTP server: how many connections, how long each may take, and
what an unparseable request gets.

``Runner`` is the app's aiohttp runner with the relay's bounds: at most server.max_connections
connections (more are answered 503 at once and closed), server.read_timeout for a connection
that sends no complete request and between kept-alive ones, and a connection handler that is
quiet under junk (one throttled info line, never a traceback; the relay's JSON error shape,
431 for a header too large). What a request means is relay.server's business, not this one's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from relay.config import Config
from relay.logs import Throttle

log = logging.getLogger("relay.server")

RawHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]  # aiohttp Server's

_BUSY_BODY = b'{"error":"the relay has server.max_connections connections open; retry shortly"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
         + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class _Busy(asyncio.Protocol):
    """A connection over server.max_connections: answered 503 at once and closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: an isinstance assert here
        # closed every such connection without its 503)
        cast(asyncio.WriteTransport, transport).write(_BUSY)
        transport.close()


class _Handler(RequestHandler):
    """aiohttp's connection handler, quiet under junk: a request it cannot parse (garbage,
    an HTTP/2 preface, a bad request line or header, a broken body, a body that does not
    decode as its Content-Encoding says, a client gone before its body arrived) is answered in
    the relay's JSON error shape (431 for a header too large) and logged as one info line at
    most every ``JUNK_EVERY`` seconds, with the count held back, never a traceback (the junk
    may carry a secret). Errors of the relay's own code still go to aiohttp's handling (500,
    logged)."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        known = _client_error(exc)
        if known is None:
            return super().handle_error(request, status, exc, message)
        status, text = known
        _log_junk(request.remote, status, exc)
        if request.writer.output_size > 0:  # part of a response went out: nothing to add
            raise ConnectionError("a response was already started")
        response = web.json_response({"error": text}, status=status)  # the API's error shape
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's error log, but a body that cannot be read once the handler is done (aiohttp
        reads what it left, to reuse the connection) is junk like the others, not a traceback."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, BaseException) and _client_error(exc) is not None:
            _log_junk(None, 0, exc)
            return
        super().log_exception(*args, **kwargs)


JUNK_EVERY = 10.0  # seconds between two "malformed HTTP request" lines
_JUNK = Throttle(JUNK_EVERY)


def _log_junk(remote: str | None, status: int, exc: BaseException | None) -> None:
    held = _JUNK.allow()
    if held is not None:
        log.info("malformed HTTP request from %s %s (%s)%s", remote or "a client",
                 f"answered {status}" if status else "dropped", type(exc).__name__,
                 f"; {held} more since the last such line" if held else "")


def _client_error(exc: BaseException | None) -> tuple[int, str] | None:
    """The status and message for a request that failed by the client's doing, or None."""
    if isinstance(exc, HttpProcessingError):
        return _parse_error(exc)
    if isinstance(exc, RequestPayloadError):
        return 400, f"the body does not decode as its Content-Encoding says ({exc})"
    if isinstance(exc, ConnectionResetError):   # nobody reads this answer: the client left
        return 400, "the connection was closed before the body arrived"
    return None


def _parse_error(exc: HttpProcessingError) -> tuple[int, str]:
    """The status and message for a request aiohttp could not parse."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        if isinstance(line, bytes | bytearray | str) and line[:1] in (b"/", "/"):
            return 414, "the request target is too long"
        return 431, f"a request header is too large (at most {exc.args[1]} bytes)"
    if "Too many headers" in (exc.message or ""):
        return 431, "too many request headers"
    return 400, "malformed HTTP request"


class _Capped:
    """aiohttp's protocol factory, handing out at most ``limit`` live connections, each
    handled by ``_Handler``."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self._server, self._limit = server, limit

    def __call__(self) -> asyncio.Protocol:
        if len(self._server.connections) >= self._limit:
            return _Busy()
        server = self._server
        return _Handler(server, loop=server._loop, **server._kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def cannot_listen(listen: str, port: int, exc: OSError) -> SystemExit:
    """The exit for a server.listen that cannot be bound, saying what to do about it."""
    if exc.errno == errno.EADDRINUSE:
        return SystemExit(f"relay: cannot listen on {listen}: port {port} is already in use "
                          "(another relay, or make run, still running?): stop it, or set "
                          "server.listen to a free port")
    return SystemExit(f"relay: cannot listen on {listen} (server.listen): {exc.strerror or exc}")


class Runner(web.AppRunner):
    """The app's runner with the relay's connection bounds: at most server.max_connections
    open (more are answered 503 and closed), and server.read_timeout for a connection that
    sends no complete request (idle, or headers half sent) and between kept-alive requests.
    A request's body gets the same time (see post_events)."""

    def __init__(self, app: web.Application, config: Config, *,
                 max_connections: int | None = None,
                 shortcut: Callable[[web.Application, RawHandler], RawHandler] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(app, access_log=None, handle_signals=False,
                         keepalive_timeout=config.server.read_timeout, **kwargs)
        self._limit = max_connections or config.server.max_connections
        self._shortcut = shortcut

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if self._shortcut is not None:  # relay.server.ingest_shortcut: the app's own handler
            server.request_handler = self._shortcut(self._app, server.request_handler)
        return _Capped(server, self._limit)  # type: ignore[return-value]
