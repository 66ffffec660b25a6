"""Test send (Braze's "test" tab): a synthetic event to one destination, now, outside the spool.

Answers with the request as sent (secrets masked) and what the receiver said, or why nothing
was sent. Used by ``POST /v1/destinations/{name}/test`` and ``relay test``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from relay import ids
from relay.auth import Signing, mask
from relay.config import Config, Destination
from relay.dispatch import client_session, send
from relay.errors import RenderError
from relay.events import Event, accept
from relay.payloads import FORMAT_STATUSES, Request, build_renderer


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


def request_json(request: Request) -> dict[str, Any]:
    body = request.body.decode("utf-8", errors="replace")
    return {"method": request.method, "url": request.url, "headers": request.headers,
            "body": body}


async def test_send(config: Config, name: str) -> dict[str, Any]:
    dest = config.destination(name)
    if dest is None:
        raise KeyError(name)
    event = synthetic_event(dest)
    delivery_id = ids.delivery_id(time.time())
    answer: dict[str, Any] = {"destination": name, "delivery_id": delivery_id,
                              "event": event.model_dump(mode="json", exclude_none=True)}
    try:
        request = Signing(dest).sign(build_renderer(dest, config).render(event, delivery_id),
                                     delivery_id)
    except RenderError as exc:
        return answer | {"sent": False, "error": str(exc)}
    answer["request"] = request_json(mask(request))
    async with client_session(config) as session:
        sent = await send(session, request, dest.timeout or config.delivery.timeout)
    answer["sent"] = True
    answer["outcome"] = sent.outcome.kind
    if sent.attempt.status_code is not None:
        answer["response"] = {"status": sent.attempt.status_code,
                              "headers": dict(sent.response_headers),
                              "body": sent.attempt.excerpt,
                              "duration_ms": round((sent.attempt.duration or 0) * 1000, 1)}
    else:
        answer["error"] = sent.attempt.error
    return answer
