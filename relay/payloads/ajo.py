"""Adobe Journey Optimizer feedback webhook (documented example: ``tests/fixtures/ajo_feedback_bounce.json``).

``imsOrg`` and ``sandbox`` come from the destination, everything else from the event. Keys are
always present in the documented order; what the event does not know is ``null``.
"""

from __future__ import annotations

from typing import Any

from relay.config import Destination
from relay.events import Event
from relay.payloads._json import dumps
from relay.request import Request, merge_headers
from relay.vocab import AJO_STATUS

_FAILURE_STATUSES = frozenset({"bounced", "aborted", "failed", "delayed"})


def ajo_body(dest: Destination, event: Event) -> dict[str, Any]:
    assert dest.ajo is not None, "config guarantees an ajo section for format ajo"
    failure = event.failure
    message_failure = message_exclusion = None
    if failure is not None and event.status in _FAILURE_STATUSES:
        message_failure = {"category": failure.category, "type": failure.type,
                           "code": failure.code, "reason": failure.reason}
    elif failure is not None and event.status == "excluded":
        message_exclusion = {"code": failure.code, "reason": failure.reason,
                             "details": failure.details}
    identity: dict[str, Any] = {}
    if event.recipient is not None:
        if event.recipient.email is not None:
            identity["email"] = [{"id": event.recipient.email, "primary": True}]
        else:
            identity["phone"] = [{"id": event.recipient.phone, "primary": True}]
    return {
        "requestId": event.request_id,
        "imsOrg": dest.ajo.ims_org,
        "sandbox": {"id": dest.ajo.sandbox.id, "name": dest.ajo.sandbox.name},
        "channel": event.channel,
        "eventType": "message.feedback",
        "messageExecution": {
            "messageExecutionID": event.message_id,
            "messageType": event.message_type,
            "campaignID": event.campaign_id,
            "campaignVersionID": event.campaign_version_id,
        },
        "messageDeliveryFeedback": {
            "feedbackStatus": {"value": AJO_STATUS[event.status]},
            "offers": None,
            "messageExclusion": message_exclusion,
            "messageFailure": message_failure,
            "retryCount": event.retry_count,
        },
        "identityMap": identity,
    }


class AjoRenderer:
    def __init__(self, dest: Destination) -> None:
        self.destination = dest
        self._headers = merge_headers({"Content-Type": "application/json"}, dest.headers)

    def render(self, event: Event, delivery_id: str) -> Request:
        return Request("POST", self.destination.url, dict(self._headers),
                       dumps(ajo_body(self.destination, event)))
