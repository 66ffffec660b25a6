"""Braze transactional email HTTP event postback (``tests/fixtures/braze_postbacks.json``).

Each status carries only the timestamps Braze documents for it, formatted
``2020-08-31T18:58:42.000+00:00``; ``reason`` on aborted and bounced; ``campaign_api_id`` and
``external_send_id`` only when known. Keys follow the documented order.
"""

from __future__ import annotations

from typing import Any

from relay.config import Destination
from relay.events import Event
from relay.payloads._json import braze_time, dumps
from relay.request import Request, merge_headers
from relay.vocab import BRAZE_STATUS

_SENT_STEPS = ("received_at", "enqueued_at", "executed_at")


def braze_body(event: Event) -> dict[str, Any]:
    status = BRAZE_STATUS[event.status]
    assert event.occurred_at is not None, "accept() fills occurred_at"
    at = braze_time(event.occurred_at)
    reason = event.failure.reason if event.failure is not None else None
    metadata: dict[str, Any] = {}
    if status == "sent":
        stamps = event.timestamps
        for step in _SENT_STEPS:
            moment = getattr(stamps, step) if stamps is not None else None
            if moment is not None:
                metadata[step] = braze_time(moment)
        sent_at = stamps.sent_at if stamps is not None and stamps.sent_at is not None else None
        metadata["sent_at"] = braze_time(sent_at) if sent_at is not None else at
    elif status == "aborted":
        if reason is not None:
            metadata["reason"] = reason
        metadata["aborted_at"] = at
    elif status == "bounced":
        metadata["bounced_at"] = at
        if reason is not None:
            metadata["reason"] = reason
    else:  # processed, delivered
        metadata[f"{status}_at"] = at
    if event.campaign_id is not None:
        metadata["campaign_api_id"] = event.campaign_id
    if event.external_send_id is not None:
        metadata["external_send_id"] = event.external_send_id
    return {"dispatch_id": event.message_id, "status": status, "metadata": metadata}


class BrazeRenderer:
    def __init__(self, dest: Destination) -> None:
        self.destination = dest
        self._headers = merge_headers({"Content-Type": "application/json"}, dest.headers)

    def render(self, event: Event, delivery_id: str) -> Request:
        return Request("POST", self.destination.url, dict(self._headers), dumps(braze_body(event)))
