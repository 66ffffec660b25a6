"""One attempt on the wire for a compiled destination: the transport call, plus what some
destinations add around it: an OAuth2 token (fetched before, refreshed once on a 401, the
request then sent once more) and the attempt's trace span (relay.tracing).

Returns the ``Exchange`` as the transport does, but for an OAuth2 token a receiver echoed: that
is hidden (``****``) in the response's headers and excerpt, since it is known nowhere else and
the test send and the activity log show the answer. Never retries beyond that one re-send and
never judges the result (that is relay.policy).
"""

from __future__ import annotations

import time

from relay import tracing
from relay.connection import Via
from relay.destinations import CompiledDestination
from relay.oauth2 import TokenError
from relay.policy import classify
from relay.redact import hide_in
from relay.request import Exchange, Request, endpoint
from relay.transport import Transport


async def send(target: CompiledDestination, transport: Transport, request: Request,
               attempt: int = 1) -> Exchange:
    """Send ``request`` (rendered and signed) to ``target``: attempt number ``attempt``."""
    if not tracing.enabled():
        if target.oauth2 is None:  # the common case: one coroutine less per attempt
            return await transport.handle_request(request, target.timeout)
        return await _send(target, transport, request)
    span = tracing.attempt(request, target.name, target.host or endpoint(request.url), attempt)
    exchange = await _send(target, transport, span.request)
    span.finish(exchange, classify(exchange, time.time()).kind)
    return exchange


async def _send(target: CompiledDestination, transport: Transport, request: Request) -> Exchange:
    provider = target.oauth2
    if provider is None:
        return await transport.handle_request(request, target.timeout)
    # The token request goes the destination's egress way (its proxy), not with its TLS
    # client certificate or CA bundle: the token endpoint is another server.
    proxy = target.via.proxy if target.via is not None else None
    via = Via(proxy=proxy) if proxy is not None else None

    async def fetch(token_request: Request, timeout: float, limit: int) -> Exchange:
        return await transport.handle_request(token_request.routed(via), timeout, limit)

    async def with_token(token: str) -> Exchange:
        exchange = await transport.handle_request(request.with_headers(**provider.header(token)),
                                                  target.timeout)
        return hide_in(exchange, (token,))

    started = time.time()
    try:
        token = await provider.token(fetch)
    except TokenError as exc:
        return Exchange(started, time.time() - started, error="token", detail=str(exc))
    exchange = await with_token(token)
    if exchange.status != 401:
        return exchange
    provider.invalidate(token)  # refused: a new token, and the request once more with it
    try:
        token = await provider.token(fetch)
    except TokenError:
        return exchange
    return await with_token(token)
