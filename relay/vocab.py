"""The relay's shared vocabulary: channels, statuses, formats, and which statuses each format says.

One home for names that config, events, routing and payloads all use, so they are written out
once. Each set is a ``Literal`` type (for pydantic and the type checker) with its values as a
tuple derived from it. The status tables follow the product contract's "Status mapping": a
local status a format cannot express is not sent there, and its delivery is recorded as skipped.
This module imports nothing of the relay.
"""

from __future__ import annotations

from typing import Literal, get_args

Channel = Literal["email", "sms"]
Status = Literal["sent", "processed", "delivered", "delayed", "bounced", "aborted", "failed",
                 "excluded"]
Format = Literal["ajo", "braze", "template"]
DeliveryState = Literal["pending", "delivered", "failed", "skipped"]

CHANNELS: tuple[Channel, ...] = get_args(Channel)
STATUSES: tuple[Status, ...] = get_args(Status)
DELIVERY_STATES: tuple[DeliveryState, ...] = get_args(DeliveryState)

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

# format -> the local statuses it can express, in the order of STATUSES
FORMAT_STATUSES: dict[str, tuple[str, ...]] = {
    "ajo": tuple(s for s in STATUSES if s in AJO_STATUS),
    "braze": tuple(s for s in STATUSES if s in BRAZE_STATUS),
    "template": STATUSES,
}


def skip_reason(fmt: str, status: str) -> str | None:
    """Why a format cannot carry this status, or None when it can."""
    if status in FORMAT_STATUSES[fmt]:
        return None
    return f"format {fmt} cannot express status {status!r}"
