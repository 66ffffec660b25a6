"""Payload shapes: turn a stored local event into the exact request a destination receives.

``build_renderers(config)`` compiles one renderer per destination once (templates are parsed
at load); ``renderer.render(event, delivery_id)`` gives a ``Request`` (method, URL, headers,
body bytes) or raises RenderError. Signing and transport are later steps that know nothing of
formats. The status tables below are the single source of truth for which local statuses each
format can express (SPEC.md "Status mapping"); routing uses them to record skipped deliveries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from relay.config import Config, Destination
from relay.events import Event

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


def skip_reason(fmt: str, status: str) -> str | None:
    """Why a format cannot carry this status, or None when it can."""
    if status in FORMAT_STATUSES[fmt]:
        return None
    return f"format {fmt} cannot express status {status!r}"


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, exactly as it will be sent."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def with_headers(self, **extra: str) -> Request:
        return Request(self.method, self.url, merge_headers(self.headers, extra), self.body)


def merge_headers(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """``base`` with ``extra`` set on top; header names compare case-insensitively."""
    lowered = {k.lower() for k in extra}
    merged = {k: v for k, v in base.items() if k.lower() not in lowered}
    merged.update(extra)
    return merged


class Renderer(Protocol):
    destination: Destination

    def render(self, event: Event, delivery_id: str) -> Request:
        """The request for this event; raises RenderError when it cannot be built."""
        ...


def build_renderer(dest: Destination, config: Config) -> Renderer:
    if dest.format == "ajo":
        from relay.payloads.ajo import AjoRenderer

        return AjoRenderer(dest)
    if dest.format == "braze":
        from relay.payloads.braze import BrazeRenderer

        return BrazeRenderer(dest)
    from relay.payloads.template import TemplateRenderer

    return TemplateRenderer(dest, config.delivery.allowed_ports)


def build_renderers(config: Config) -> dict[str, Renderer]:
    """One compiled renderer per destination name."""
    return {dest.name: build_renderer(dest, config) for dest in config.destinations}
