"""Ingest: a request's events with their deliveries, stored all or nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from relay.spool.records import Ingested, Receipt
from relay.spool.store import Store
from relay.spool.wire import IngestJob

if TYPE_CHECKING:
    from relay.events import Accepted
    from relay.routing import Route


class IngestMixin(Store):
    async def ingest_receipt(self, events: Sequence[tuple[Accepted, Sequence[Route]]]) -> Receipt:
        """Store events with their deliveries, all or nothing; resolves once committed.

        A sender id seen within ``dedupe_window`` is not stored again: its entry is a duplicate
        carrying the deliveries first created for it. Raises SpoolFull when ``max_events``
        events already await delivery. The writer does the work (Writer.ingest_group) and
        writes the receipt's JSON too, off the event loop's core.
        """
        now = self.clock()
        answer = await self._call(IngestJob(now, now - self.dedupe_window, [
            (a.id, int(a.sender_id), a.received_at, a.body,   # an IngestEventTuple
             [(r.destination, r.state, r.reason) for r in routes])
            for a, routes in events]))
        events_json, stored, duplicates, skipped, pending, fresh = answer
        return Receipt(events_json, stored, duplicates, skipped, pending, fresh,
                       [a.body for a, _ in events])

    async def ingest(self, events: Sequence[tuple[Accepted, Sequence[Route]]]) -> list[Ingested]:
        """ingest_receipt, with the receipt as one Ingested per event."""
        return (await self.ingest_receipt(events)).entries()
