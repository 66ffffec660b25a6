"""Ingest: many events with their deliveries, in bulk, inside one group commit."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from typing import Any

from relay import ids
from relay.errors import SpoolError, SpoolFull
from relay.events import Accepted
from relay.routing import Route
from relay.spool.records import Ingested
from relay.spool.store import Store, _Job


class IngestMixin(Store):
    async def ingest(self, events: Sequence[tuple[Accepted, Sequence[Route]]]) -> list[Ingested]:
        """Store events with their deliveries, all or nothing; resolves once committed.

        A sender id seen within ``dedupe_window`` is not stored again: its entry is a duplicate
        carrying the deliveries first created for it. Raises SpoolFull when ``max_events``
        events already await delivery.
        """
        if self._writer is None or self._loop is None:
            raise SpoolError("the spool is closed")
        future: asyncio.Future[list[Ingested]] = self._loop.create_future()
        self._jobs.put(_Job(future, None, events))
        return await future

    def _ingest_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[Any, ...]]:
        """All ingest jobs of one group with one dedupe query and two bulk inserts.

        Each job stays all-or-nothing: a job refused for the spool limit adds no rows. Event
        sequence numbers are assigned here (the writer owns them) so deliveries need no
        per-event round trip for ``lastrowid``.
        """
        now = self.clock()
        known = self._recent_sender_ids(conn, jobs, now - self.dedupe_window)
        event_rows: list[tuple[Any, ...]] = []
        delivery_rows: list[tuple[Any, ...]] = []
        outcomes: list[tuple[Any, ...]] = []
        for job in jobs:
            assert job.events is not None
            results: list[Ingested] = []
            job_events: list[tuple[Any, ...]] = []
            job_deliveries: list[tuple[Any, ...]] = []
            job_known: dict[str, str] = {}
            new_open = 0
            for accepted, routes in job.events:
                if accepted.sender_id:
                    listing = job_known.get(accepted.id) or known.get(accepted.id)
                    if listing is not None:
                        results.append(Ingested(accepted.id, True, _unpack(listing)))
                        continue
                seq = self._next_seq + len(event_rows) + len(job_events)
                created = [(r.destination, ids.delivery_id(now), r.state) for r in routes]
                pending = sum(1 for c in created if c[2] == "pending")
                new_open += pending > 0
                listing = _pack(created)
                job_events.append((seq, accepted.id, int(accepted.sender_id), accepted.received_at,
                                   pending, listing, accepted.to_json()))
                job_deliveries += [(did, seq, dest, state, now, now, now, route.reason)
                                   for (dest, did, state), route in zip(created, routes, strict=True)]
                if accepted.sender_id:
                    job_known[accepted.id] = listing
                results.append(Ingested(accepted.id, False, created))
            if new_open and self.open_events + new_open > self.max_events:
                outcomes.append((job.future, None, SpoolFull(
                    f"the spool holds spool.max_events={self.max_events} events awaiting "
                    "delivery", retry_after=30)))
                continue
            self.open_events += new_open
            known.update(job_known)
            event_rows += job_events
            delivery_rows += job_deliveries
            outcomes.append((job.future, results, None))
        if event_rows:
            conn.executemany(
                "INSERT INTO events(seq, id, sender_id, received_at, pending, deliveries, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", event_rows)
            self._next_seq += len(event_rows)
        if delivery_rows:
            conn.executemany(
                "INSERT INTO deliveries(delivery_id, event_seq, destination, state, not_before, "
                "created_at, updated_at, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", delivery_rows)
        return outcomes

    def _recent_sender_ids(self, conn: sqlite3.Connection, jobs: list[_Job],
                           since: float) -> dict[str, str]:
        """sender id -> deliveries listing, for ids of these jobs stored since ``since``."""
        ids = list({a.id for job in jobs for a, _ in job.events or () if a.sender_id})
        known: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = conn.execute(
                f"SELECT id, deliveries FROM events WHERE sender_id = 1 AND id IN "
                f"({','.join('?' * len(chunk))}) AND received_at >= ? ORDER BY seq",
                (*chunk, since))
            known.update(rows)  # ordered by seq: the newest entry for an id wins
        return known


def _pack(deliveries: list[tuple[str, str, str]]) -> str:
    """``[(destination, delivery_id, state)]`` as ``dest id state|...`` (names have no spaces
    or bars: config restricts them), several times cheaper than JSON on the ingest path."""
    return "|".join(f"{d} {i} {s}" for d, i, s in deliveries)


def _unpack(listing: str) -> list[tuple[str, str, str]]:
    return [tuple(part.split(" ", 2)) for part in listing.split("|")] if listing else []  # type: ignore[misc]
