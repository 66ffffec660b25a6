"""Payload shapes: turn a stored local event into the request body a destination documents.

The status tables below are the single source of truth for which local statuses each format can
express (SPEC.md "Status mapping"); routing uses them to record inexpressible ones as skipped.
"""

from __future__ import annotations

# local status -> AJO messageDeliveryFeedback.feedbackStatus.value
AJO_STATUS: dict[str, str] = {
    "sent": "sent",
    "delivered": "delivered",
    "delayed": "delay",
    "bounced": "bounce",
    "aborted": "error",
    "failed": "error",
    "excluded": "exclude",
}

# local status -> Braze transactional postback "status"
BRAZE_STATUS: dict[str, str] = {
    "sent": "sent",
    "processed": "processed",
    "delivered": "delivered",
    "bounced": "bounced",
    "aborted": "aborted",
    "failed": "aborted",
    "excluded": "aborted",
}

ALL_STATUSES = ("sent", "processed", "delivered", "delayed", "bounced", "aborted", "failed",
                "excluded")

# format -> the local statuses it can express, in the order above
FORMAT_STATUSES: dict[str, tuple[str, ...]] = {
    "ajo": tuple(s for s in ALL_STATUSES if s in AJO_STATUS),
    "braze": tuple(s for s in ALL_STATUSES if s in BRAZE_STATUS),
    "template": ALL_STATUSES,
}
