"""The dispatcher's side of the spool: due work, attempt outcomes, replay of the dead letter."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Collection, Sequence
from typing import Any

from relay.errors import SpoolError
from relay.spool.records import Attempt, Due, where
from relay.spool.store import Store, _Job


class QueueMixin(Store):
    async def due(self, now: float, limit: int, destinations: Sequence[str],
                  exclude: Collection[int] = ()) -> list[Due]:
        """Pending deliveries due by ``now`` for these destinations, oldest first."""
        if not destinations or limit <= 0:
            return []
        where, args = self._pending_filter(destinations, exclude)
        sql = ("SELECT d.seq, d.delivery_id, d.destination, d.attempts, d.failures, "
               "d.first_attempt_at, d.held, d.event_seq, e.body FROM deliveries d "
               "JOIN events e ON e.seq = d.event_seq "
               f"WHERE d.state = 'pending' AND d.not_before <= ? {where} "
               "ORDER BY d.not_before, d.seq LIMIT ?")
        rows = await self._read(lambda conn: conn.execute(sql, (now, *args, limit)).fetchall())
        return [Due(*row) for row in rows]

    async def next_due_at(self, destinations: Sequence[str],
                          exclude: Collection[int] = ()) -> float | None:
        """The earliest ``not_before`` among pending deliveries of these destinations."""
        if not destinations:
            return None
        where, args = self._pending_filter(destinations, exclude)
        sql = f"SELECT MIN(d.not_before) FROM deliveries d WHERE d.state = 'pending' {where}"
        return await self._read(lambda conn: conn.execute(sql, args).fetchone()[0])

    @staticmethod
    def _pending_filter(destinations: Sequence[str],
                        exclude: Collection[int]) -> tuple[str, list[Any]]:
        where = f"AND d.destination IN ({','.join('?' * len(destinations))})"
        args: list[Any] = list(destinations)
        if exclude:
            where += f" AND d.seq NOT IN ({','.join('?' * len(exclude))})"
            args += list(exclude)
        return where, args

    async def record_attempt(self, due: Due, attempt: Attempt, *, state: str,
                             not_before: float | None, failures: int,
                             reason: str | None) -> None:
        """Write one attempt and the delivery's new state; resolves once committed.

        Outcomes that reach the writer together are written in bulk (see _record_group).
        """
        if self._writer is None or self._loop is None:
            raise SpoolError("the spool is closed")
        future: asyncio.Future[None] = self._loop.create_future()
        self._jobs.put(_Job(future, None, outcome=(due, attempt, state, not_before, failures,
                                                   reason)))
        await future

    def _record_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[Any, ...]]:
        """Every attempt outcome of one group: two executemany and, for finished deliveries,
        one pending-count update per event, instead of six statements per outcome."""
        now = self.clock()
        attempts, updates, finished = [], [], []
        for job in jobs:
            due, attempt, state, not_before, failures, reason = job.outcome  # type: ignore[misc]
            n = due.attempts + 1
            attempts.append((due.seq, n, attempt.at, attempt.duration, attempt.status_code,
                             attempt.error, attempt.excerpt))
            updates.append((n, failures, state, not_before if not_before is not None else attempt.at,
                            now, attempt.at, reason, due.seq))
            if state != "pending":
                finished.append(due.event_seq)
        conn.executemany(
            "INSERT INTO attempts(delivery_seq, n, at, duration, status_code, error, excerpt) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", attempts)
        conn.executemany(
            "UPDATE deliveries SET attempts = ?, failures = ?, state = ?, not_before = ?, "
            "updated_at = ?, first_attempt_at = COALESCE(first_attempt_at, ?), reason = ? "
            "WHERE seq = ?", updates)
        if finished:
            conn.executemany("UPDATE events SET pending = pending - 1 WHERE seq = ?",
                             [(seq,) for seq in finished])
            seqs = sorted(set(finished))
            for start in range(0, len(seqs), 500):
                chunk = seqs[start:start + 500]
                self.open_events -= conn.execute(
                    f"SELECT COUNT(*) FROM events WHERE pending = 0 AND seq IN "
                    f"({','.join('?' * len(chunk))})", chunk).fetchone()[0]
        return [(job.future, None, None) for job in jobs]

    async def replay(self, *, delivery_ids: Sequence[str] = (), destination: str | None = None,
                     failed_since: float | None = None) -> list[str]:
        """Put failed deliveries back to pending, due now, with fresh retry windows.

        Selects by ids, or by destination and/or failure time; returns the ids replayed.
        """
        def write(conn: sqlite3.Connection) -> list[str]:
            clause, args = where(
                ("state = ?", "failed"),
                (f"delivery_id IN ({','.join('?' * len(delivery_ids))})", list(delivery_ids)),
                ("destination = ?", destination), ("updated_at >= ?", failed_since))
            rows = conn.execute(f"SELECT seq, delivery_id, event_seq FROM deliveries WHERE "
                                f"{clause} LIMIT 100000", args).fetchall()
            now = self.clock()
            for seq, _, event_seq in rows:
                conn.execute("UPDATE deliveries SET state = 'pending', not_before = ?, "
                             "failures = 0, first_attempt_at = NULL, held = 0, reason = NULL, "
                             "updated_at = ? WHERE seq = ?", (now, now, seq))
                before = conn.execute("UPDATE events SET pending = pending + 1 WHERE seq = ? "
                                      "RETURNING pending", (event_seq,)).fetchone()
                if before is not None and before[0] == 1:
                    self.open_events += 1
            return [delivery_id for _, delivery_id, _ in rows]

        return await self.submit(write)

    async def add_held(self, destinations: Sequence[str], seconds: float) -> int:
        """Credit ``seconds`` of host suspension to the retry window of every delivery of these
        destinations that has started retrying (held time must not use up retry_window)."""
        if not destinations or seconds <= 0:
            return 0
        marks = ",".join("?" * len(destinations))

        def write(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE deliveries SET held = held + ? WHERE state = 'pending' AND "
                f"first_attempt_at IS NOT NULL AND destination IN ({marks})",
                (seconds, *destinations)).rowcount

        return await self.submit(write)

    async def pending_by_destination(self) -> dict[str, int]:
        """How many deliveries wait, per destination."""
        rows = await self._read(lambda conn: conn.execute(
            "SELECT destination, COUNT(*) FROM deliveries WHERE state = 'pending' "
            "GROUP BY destination").fetchall())
        return dict(rows)

    async def oldest_due(self, now: float) -> float | None:
        """``not_before`` of the longest-waiting due delivery, or None when nothing is due."""
        return await self._read(lambda conn: conn.execute(
            "SELECT MIN(not_before) FROM deliveries WHERE state = 'pending' AND not_before <= ?",
            (now,)).fetchone()[0])
