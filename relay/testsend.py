"""Test send (Braze's "test" tab): a synthetic event to one destination, now, outside the spool.

Answers with the request as sent (secrets masked) and what the receiver said, or why nothing
was sent. Used by ``POST /v1/destinations/{name}/test`` and ``relay test``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from relay import ids
from relay.auth import MASKED, destination_secrets, mask
from relay.config import Config, Destination, OAuth2Auth
from relay.destinations import CompiledDestination
from relay.errors import RenderError
from relay.events import Event, accept
from relay.policy import classify
from relay.request import Request
from relay.sending import send
from relay.transport import AiohttpTransport, Transport
from relay.vocab import FORMAT_STATUSES


def synthetic_event(dest: Destination) -> Event:
    """An event this destination accepts: its first channel, a status it takes and can express."""
    statuses = dest.statuses or FORMAT_STATUSES[dest.format]
    status = "delivered" if "delivered" in statuses else statuses[0]
    channel = dest.channels[0]
    recipient = {"email": "relay-test@example.com"} if channel == "email" else \
        {"phone": "+15555550100"}
    event = Event.model_validate_json(json.dumps({
        "id": f"relay-test-{ids.request_id()[:12]}", "channel": channel, "status": status,
        "message_id": f"relay-test-{ids.request_id()[:12]}", "recipient": recipient,
        "campaign_id": "relay-test", "attributes": {"test": True, "order_id": "TEST-1"},
        "failure": {"reason": "relay test event"} if status in ("bounced", "aborted", "failed")
        else None,
    }))
    accepted = accept(event, time.time()).event
    assert accepted is not None
    return accepted


def controls(target: CompiledDestination) -> dict[str, Any]:
    """The destination's connection and auth controls as people may see them (secrets masked):
    proxy, TLS, OAuth2 (its token is fetched when sending and shown as ``Bearer ****``)."""
    shown: dict[str, Any] = dict(target.via.describe()) if target.via is not None else {}
    auth = target.destination.auth
    if isinstance(auth, OAuth2Auth):
        shown["auth"] = {"type": "oauth2", "token_url": auth.token_url,
                         "client_id": auth.client_id, "client_secret": MASKED,
                         "adds": f"{auth.header}: {auth.scheme} {MASKED}".replace("  ", " ")}
    limit = target.destination.rate_limit
    if limit is not None:
        shown["rate_limit"] = limit.model_dump()
    return shown


def request_json(request: Request) -> dict[str, Any]:
    body = request.body.decode("utf-8", errors="replace")
    return {"method": request.method, "url": request.url, "headers": request.headers,
            "body": body}


async def test_send(config: Config, target: CompiledDestination,
                    transport: Transport | None = None) -> dict[str, Any]:
    """Render, sign and send one synthetic event to ``target``; the answer shows both sides."""
    dest = target.destination
    event = synthetic_event(dest)
    delivery_id = ids.delivery_id(time.time())
    answer: dict[str, Any] = {"destination": dest.name, "delivery_id": delivery_id,
                              "event": event.model_dump(mode="json", exclude_none=True)}
    try:
        request = target.request(event, delivery_id)
    except RenderError as exc:
        return answer | {"sent": False, "error": str(exc)}
    answer["request"] = request_json(mask(request, destination_secrets(dest)))
    answer["request"].update(controls(target))
    if transport is not None:
        exchange = await send(target, transport, request)
    else:
        own = AiohttpTransport(config)
        try:
            exchange = await send(target, own, request)
        finally:
            await own.close()
    answer["sent"] = True
    answer["outcome"] = classify(exchange, time.time()).kind
    if exchange.status is not None:
        # Secrets the receiver echoed back are hidden (relay.redact; an OAuth2 token already
        # is, by send): many test endpoints answer with the request they got.
        hide = target.echoes.hide
        answer["response"] = {"status": exchange.status,
                              "headers": {name: hide(value, request)
                                          for name, value in exchange.headers.items()},
                              "body": hide(exchange.excerpt or "", request),
                              "duration_ms": round(exchange.duration * 1000, 1)}
    else:
        answer["error"] = exchange.error_text
    return answer
