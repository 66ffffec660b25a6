"""Fan-out: which destinations an event goes to, and which of those are skipped.

A destination matches when the event's channel is in its ``channels``, its status is in its
``statuses`` (when given) and, for ``ajo``, the event's ``org`` / ``sandbox`` (when given) name
that destination's IMS org and sandbox. A matching destination whose format cannot express the
status gets a ``skipped`` delivery with the reason, so the activity log shows why nothing was sent.
The table is precomputed per (channel, status): routing an event costs a dict lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import Config, Destination
from relay.events import Accepted, Event
from relay.vocab import CHANNELS, STATUSES, skip_reason


@dataclass(frozen=True, slots=True)
class Route:
    destination: str
    state: str              # "pending" or "skipped"
    reason: str | None = None


class Router:
    """Routes events to the destinations of one config."""

    def __init__(self, config: Config) -> None:
        self._table: dict[tuple[str, str], tuple[tuple[Destination, Route], ...]] = {}
        self._routes: dict[tuple[str, str], tuple[Route, ...]] = {}  # without org or sandbox
        for channel in CHANNELS:
            for status in STATUSES:
                self._table[channel, status] = tuple(
                    (dest, _route(dest, status)) for dest in config.destinations
                    if channel in dest.channels
                    and (dest.statuses is None or status in dest.statuses))
                self._routes[channel, status] = tuple(
                    route for _, route in self._table[channel, status])

    def route(self, event: Event | Accepted) -> tuple[Route, ...]:
        if event.org is None and event.sandbox is None:
            return self._routes[event.channel, event.status]
        candidates = self._table[event.channel, event.status]
        return tuple(route for dest, route in candidates if _ajo_matches(dest, event))


def _route(dest: Destination, status: str) -> Route:
    reason = skip_reason(dest.format, status)
    return Route(dest.name, "pending") if reason is None else Route(dest.name, "skipped", reason)


def _ajo_matches(dest: Destination, event: Event | Accepted) -> bool:
    if dest.format != "ajo" or dest.ajo is None:
        return True  # org/sandbox only choose among ajo destinations
    if event.org is not None and event.org != dest.ajo.ims_org:
        return False
    sandbox = dest.ajo.sandbox
    return event.sandbox is None or event.sandbox in (sandbox.id, sandbox.name)
