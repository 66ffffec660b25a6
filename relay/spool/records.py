"""What the spool hands out: ingest results, due deliveries, attempts, activity-log records."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from relay.frozen import frozen

DUE_BUDGET = 4 << 20  # characters of event JSON one due batch may hold (one event at least)


class Receipt(NamedTuple):
    """What the spool did with one request's events, as the ingest answer needs it."""

    events_json: str        # JSON array: per event {"id", "deliveries": [...], "duplicate"?}
    stored: int             # events stored now
    duplicates: int         # events whose id was seen within the dedupe window
    skipped: list[str]      # destination of every skipped delivery created now
    pending: bool           # some delivery created now awaits sending: wake the dispatcher
    # (index of the event in the request, event seq, delivery seq, delivery id, destination)
    # of each pending delivery created now, and the events' stored JSON, so this process's
    # dispatcher can start them from memory (``dues``) instead of reading them back. SQLite:
    # always; PostgreSQL: when they were stored leased to this replica, with ``mark``, the
    # dispatcher's look count when the ingest was queued (Dispatcher.offer_mark).
    fresh: Sequence[tuple[int, int, int, str, str]] = ()
    bodies: Sequence[str] = ()
    mark: int | None = None
    # PostgreSQL: destinations of pending deliveries created now that are not in ``fresh``
    # (stored for any replica), when some are (empty when ``fresh`` is: that offer wakes)
    unoffered: frozenset[str] = frozenset()

    def dues(self) -> list[Due]:
        """The pending deliveries created now, as the spool would hand them out when due."""
        bodies = self.bodies
        return [Due(seq, delivery_id, destination, 0, 0, None, 0.0, event_seq, bodies[index])
                for index, event_seq, seq, delivery_id, destination in self.fresh]

    def entries(self) -> list[Ingested]:
        """The receipt as objects (tests, tools); deliveries are "pending" or "skipped" as
        created."""
        return [Ingested(e["id"], e.get("duplicate", False),
                         [(d["destination"], d["delivery_id"],
                           "skipped" if d.get("skipped") else "pending")
                          for d in e["deliveries"]])
                for e in json.loads(self.events_json)]


class Ingested(NamedTuple):
    """What the spool did with one accepted event (a NamedTuple: one per ingested event)."""

    id: str
    duplicate: bool
    deliveries: list[tuple[str, str, str]]  # (destination, delivery_id, state)


@frozen
class Due:
    """A pending delivery whose time has come, with the event it carries."""

    seq: int
    delivery_id: str
    destination: str
    attempts: int
    failures: int
    first_attempt_at: float | None
    held: float
    event_seq: int
    event_json: str


class DueBatch(NamedTuple):
    """One look at the work queue: what is due, and what the dispatcher needs to know to wait."""

    due: list[Due]
    complete: bool          # ``due`` is every delivery due by then (not excluded): no need to
                            # look again until something changes
    next_at: float | None   # the earliest time another delivery falls due, if known
    seen_upto: int = 0      # SQLite: every delivery up to this seq was visible to the read
                            # (due ones are in ``due`` unless left out or cut); else 0
    given_back: Sequence[int] = ()  # PostgreSQL: rows it claimed and gave back (past its
                                    # budget): any replica's now
    capped: frozenset[str] | None = None  # a look's destinations that may have more due
                                          # (a whole share given, rows cut by the limit or,
                                          # on PostgreSQL, locked elsewhere); every other one
                                          # asked for has all its due deliveries in ``due``.
                                          # None: any may have more


@frozen
class Attempt:
    """One try, as the activity log shows it."""

    at: float
    duration: float | None
    status_code: int | None
    error: str | None
    excerpt: str | None

    def to_json(self) -> dict[str, Any]:
        return {"at": iso(self.at),
                "duration_ms": None if self.duration is None else round(self.duration * 1000, 1),
                "status_code": self.status_code, "error": self.error,
                "response_excerpt": self.excerpt}


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    delivery_id: str
    event_id: str
    destination: str
    state: str
    attempts: int
    not_before: float
    created_at: float
    updated_at: float
    reason: str | None
    seq: int

    def to_json(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "event_id": self.event_id,
            "destination": self.destination,
            "status": self.state,
            "attempt_count": self.attempts,
            "next_attempt_at": iso(self.not_before) if self.state == "pending" else None,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "reason": self.reason,
        }


def iso(ts: float) -> str:
    try:
        whole = time.gmtime(ts)
    except (OverflowError, OSError, ValueError):
        # a time no calendar here can write (a spool written with a duration past the ten
        # years config now allows): the latest one, not a 500 for the whole listing
        return "9999-12-31T23:59:59.999Z" if ts > 0 else "0001-01-01T00:00:00.000Z"
    return time.strftime("%Y-%m-%dT%H:%M:%S", whole) + f".{int(ts % 1 * 1000):03d}Z"
