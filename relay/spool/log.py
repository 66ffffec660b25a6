"""The activity log: reading deliveries and attempts, and pruning what retention lets go."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from relay.spool.delivery_ids import BY_ID, DeliveryIds
from relay.spool.records import Attempt, DeliveryRecord
from relay.spool.sql import where
from relay.spool.store import Store
from relay.spool.wire import PruneJob

_SELECT_DELIVERY = (
    "SELECT d.delivery_id, e.id, d.destination, d.state, d.attempts, d.not_before, d.created_at, "
    "d.updated_at, d.reason, d.seq FROM deliveries d JOIN events e ON e.seq = d.event_seq")


class LogMixin(Store):
    _delivery_ids: DeliveryIds | None = None  # with the file's key, read once

    def _by_id(self, conn: sqlite3.Connection, delivery_id: str) -> tuple[int, str, str]:
        """The values for delivery_ids.BY_ID (on a reader thread)."""
        if self._delivery_ids is None:
            self._delivery_ids = DeliveryIds.of(conn)
        return self._delivery_ids.args(delivery_id)

    async def prune(self, retention: float) -> int:
        """Delete finished events (and their deliveries and attempts) older than ``retention``;
        at most 10,000 events per call."""
        result: int = await self._call(PruneJob(self.clock() - retention))
        return result

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        rows = await self._read(lambda conn: conn.execute(
            f"{_SELECT_DELIVERY} WHERE {BY_ID}", self._by_id(conn, delivery_id)).fetchall(),
            lane="api")
        return DeliveryRecord(*rows[0]) if rows else None

    async def list_deliveries(
        self,
        *,
        state: str | None = None,
        destination: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[DeliveryRecord]:
        """Deliveries in creation order, after the ``seq`` cursor, filtered."""
        clause, args = where(("d.seq > ?", after), ("d.state = ?", state),
                             ("d.destination = ?", destination))
        sql = f"{_SELECT_DELIVERY} WHERE {clause} ORDER BY d.seq LIMIT ?"
        rows = await self._read(lambda conn: conn.execute(sql, (*args, limit)).fetchall(), lane="api")
        return [DeliveryRecord(*row) for row in rows]

    async def attempts_of(self, seqs: Sequence[int]) -> dict[int, list[Attempt]]:
        """Attempts of these deliveries (by seq), oldest first."""
        if not seqs:
            return {}
        sql = (f"SELECT delivery_seq, at, duration, status_code, error, excerpt FROM attempts "
               f"WHERE delivery_seq IN ({','.join('?' * len(seqs))}) ORDER BY delivery_seq, n")
        rows = await self._read(lambda conn: conn.execute(sql, list(seqs)).fetchall(), lane="api")
        found: dict[int, list[Attempt]] = {}
        for seq, *fields in rows:
            found.setdefault(seq, []).append(Attempt(*fields))
        return found

    async def event_json(self, delivery_id: str) -> str | None:
        """The stored event (normalised JSON) behind a delivery."""
        rows = await self._read(lambda conn: conn.execute(
            f"SELECT e.body FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE {BY_ID}",
            self._by_id(conn, delivery_id)).fetchall(), lane="api")
        return rows[0][0] if rows else None

    async def counts(self) -> dict[str, int]:
        """Number of deliveries by state."""
        rows = await self._read(lambda conn: conn.execute(
            "SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall(), lane="api")
        return {state: n for state, n in rows}
