"""Payload shapes: turn a stored local event into the exact request a destination receives.

``build_renderer(dest, config)`` compiles one destination's renderer (templates are parsed
then, once: ``relay.destinations`` calls it when a config is loaded); ``renderer.render(event,
delivery_id)`` gives a ``Request`` (method, URL, headers, body bytes) or raises RenderError.
Signing and transport are later steps that know nothing of formats. Which statuses each format
can express is in ``relay.vocab``.
"""

from __future__ import annotations

from typing import Protocol

from relay.config import Config, Destination
from relay.events import Event
from relay.payloads.ajo import AjoRenderer
from relay.payloads.braze import BrazeRenderer
from relay.payloads.template import TemplateRenderer
from relay.request import Request


class Renderer(Protocol):
    destination: Destination

    def render(self, event: Event, delivery_id: str) -> Request:
        """The request for this event; raises RenderError when it cannot be built."""
        ...


def build_renderer(dest: Destination, config: Config) -> Renderer:
    """The renderer of one destination; template syntax errors raise ConfigError (paths
    relative to the destination)."""
    if dest.format == "ajo":
        return AjoRenderer(dest)
    if dest.format == "braze":
        return BrazeRenderer(dest)
    return TemplateRenderer(dest, config.delivery)


__all__ = ["AjoRenderer", "BrazeRenderer", "Renderer", "TemplateRenderer", "build_renderer"]
