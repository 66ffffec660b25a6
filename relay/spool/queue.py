"""The dispatcher's side of the spool: due work, attempt outcomes, replay of the dead letter."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

import orjson

from relay.spool.records import DUE_BUDGET, Attempt, Due, DueBatch
from relay.spool.store import Store
from relay.spool.wire import AddHeldJob, RecordJob, ReplayJob

# The lists ride in as JSON (destinations asked for, seqs left out), so the statements' text
# never changes and they stay prepared. Every read walks deliveries_due (destination,
# not_before, seq) once per destination asked for: a destination left out (a suspended host's,
# one at its limit) is never read, however large its backlog. Ordered by time alone, the index
# had every look walk the due rows of the destinations it did not ask for: 60,000 of a dead
# receiver's made a look 15 ms instead of 1.5 (tests/test_backlog_looks.py).
_LEFT_OUT = "d.seq NOT IN (SELECT value FROM json_each(:exclude))"


def _next_due(later: str = "") -> str:
    """The earliest not_before among pending deliveries of the destinations (not left out),
    ``later`` than something: one probe of each destination's first row."""
    return ("SELECT MIN((SELECT d.not_before FROM deliveries d WHERE d.destination = w.value "
            f"AND d.state = 'pending'{later} AND {_LEFT_OUT} ORDER BY d.not_before LIMIT 1)) "
            "FROM json_each(:destinations) w")


_NEXT_DUE = _next_due()

# The oldest due rows of each destination, as many as fit in :budget characters of event JSON
# (at least one): the running total reads only the events' size column; bodies are read for
# the rows kept.
# - The candidates: each destination asked for that has a due row ("busy", one probe each)
#   gives its first ``share`` due rows, merged by time. SQLite has no LATERAL join: each
#   destination's rows come as a JSON array from a subquery of its own.
# - ``share`` is :limit split between the busy destinations (rounded up): a look reads what it
#   hands out, however many destinations have a backlog (past :limit of them, one row and a
#   probe each; each giving :limit, 100 of them made a look of 256 read 25,600 rows: 33 ms).
#   Every busy destination gets its part of the look: one destination's old backlog never
#   fills it (merged by time alone, the oldest took the whole look, look after look, and a
#   live destination's deliveries waited for that backlog to drain: tests/test_fairness.py).
#   A destination that gave its whole share may have more: the look is then not complete,
#   and the dispatcher looks again once it has used the batch.
# With them, in the same read: how many rows were due (up to :limit) before the budget, the
# destinations that gave their whole share or lost candidates to the limit (every other one
# asked for had all its due rows read), and the earliest not_before still to come, so a
# dispatcher that got every due row need not ask again (at one event at a time the dispatcher
# read 5 times per delivery, then under 2.5), and the highest delivery seq this read could see
# (an offer of a row it saw is not queued again).
_DUE_OF = f"d.state = 'pending' AND d.not_before <= :now AND {_LEFT_OUT}"
_POLL = (
    "WITH busy AS MATERIALIZED (SELECT DISTINCT w.value AS name FROM json_each(:destinations) w "
    f"WHERE EXISTS (SELECT 1 FROM deliveries d WHERE d.destination = w.value AND {_DUE_OF})), "
    "share(n) AS MATERIALIZED (SELECT (:limit + COUNT(*) - 1) / MAX(COUNT(*), 1) FROM busy), "
    "candidates AS MATERIALIZED (SELECT busy.name, (SELECT json_group_array(seq) FROM ("
    f"SELECT d.seq FROM deliveries d WHERE d.destination = busy.name AND {_DUE_OF} "
    "ORDER BY d.not_before, d.seq LIMIT (SELECT n FROM share))) AS seqs FROM busy), "
    "due AS MATERIALIZED (SELECT d.seq, d.delivery_id, d.destination, d.attempts, "
    "d.failures, d.first_attempt_at, d.held, d.event_seq, d.not_before, e.size, "
    "SUM(e.size) OVER (ORDER BY d.not_before, d.seq ROWS UNBOUNDED PRECEDING) AS upto "
    "FROM deliveries d JOIN events e ON e.seq = d.event_seq "
    "WHERE d.seq IN (SELECT j.value FROM candidates c, json_each(c.seqs) j) "
    "ORDER BY d.not_before, d.seq LIMIT :limit) "
    "SELECT (SELECT json_group_array(json_array(seq, delivery_id, destination, attempts, "
    "failures, first_attempt_at, held, event_seq, body)) FROM ("
    "SELECT due.*, e.body FROM due JOIN events e ON e.seq = due.event_seq "
    "WHERE due.upto - due.size < :budget ORDER BY due.not_before, due.seq)), "
    "(SELECT COUNT(*) FROM due), "
    "(SELECT json_group_array(c.name) FROM candidates c LEFT JOIN (SELECT destination, "
    "COUNT(*) AS n FROM due GROUP BY destination) t ON t.destination = c.name "
    "WHERE json_array_length(c.seqs) >= (SELECT n FROM share) "
    "OR json_array_length(c.seqs) > COALESCE(t.n, 0)), "
    f"({_next_due(' AND d.not_before > :now')}), "
    "(SELECT MAX(seq) FROM deliveries)")

# The earliest not_before of any pending delivery, found as _next_due finds it: each
# destination with pending deliveries (a skip through deliveries_due from one to the next)
# probed once, not every pending row read.
_OLDEST = (
    "WITH RECURSIVE dst(name) AS ("
    "SELECT (SELECT MIN(destination) FROM deliveries WHERE state = 'pending') "
    "UNION ALL SELECT (SELECT MIN(destination) FROM deliveries "
    "WHERE state = 'pending' AND destination > dst.name) FROM dst WHERE dst.name IS NOT NULL) "
    "SELECT MIN((SELECT not_before FROM deliveries WHERE state = 'pending' "
    "AND destination = dst.name ORDER BY not_before LIMIT 1)) FROM dst")


def _pending_args(destinations: Sequence[str], exclude: Collection[int]) -> dict[str, Any]:
    return {"destinations": json.dumps(list(destinations)), "exclude": json.dumps(list(exclude))}


class QueueMixin(Store):
    async def due(self, now: float, limit: int, destinations: Sequence[str],
                  exclude: Collection[int] = (), budget: int = DUE_BUDGET) -> list[Due]:
        """Pending deliveries due by ``now`` for these destinations, oldest first (of each
        destination's share, with three or more that have due ones: _POLL): at most
        ``limit``, and no more than fit in ``budget`` characters of event JSON (one at least)."""
        return (await self.poll(now, limit, destinations, exclude, budget)).due

    async def poll(self, now: float, limit: int, destinations: Sequence[str],
                   exclude: Collection[int] = (), budget: int = DUE_BUDGET) -> DueBatch:
        """``due``'s rows, whether they are all that is due by ``now`` (fewer than ``limit``,
        none left out for the budget), and the earliest ``not_before`` after ``now``: one read.

        The rows come back as one JSON array in one row: Python's sqlite3 releases the GIL for
        each row it steps to, and the reader thread must win it back from the busy event loop
        every time (256 rows took tens of ms under load). orjson reads it: 0.22 us a row, where
        json took 1.09 (each event's JSON is a string in it, every quote escaped).
        """
        if not destinations or limit <= 0:
            return DueBatch([], True, None)
        args = {**_pending_args(destinations, exclude), "now": now, "limit": limit,
                "budget": budget}
        found, counted, capped, next_at, seen_upto = await self._read(
            lambda conn: conn.execute(_POLL, args).fetchone())
        rows = [Due(*row) for row in orjson.loads(found)]
        # the destinations that may have more due: those that gave their whole share, or
        # some of whose candidates the limit left out. Cut for the budget, the rows left out
        # could be any destination's.
        short = frozenset(orjson.loads(capped))
        cut = len(rows) != counted
        return DueBatch(rows, not cut and not short and counted < limit, next_at,
                        seen_upto or 0, capped=None if cut else short)

    async def next_due_at(self, destinations: Sequence[str],
                          exclude: Collection[int] = ()) -> float | None:
        """The earliest ``not_before`` among pending deliveries of these destinations."""
        if not destinations:
            return None
        args = _pending_args(destinations, exclude)
        return await self._read(lambda conn: conn.execute(_NEXT_DUE, args).fetchone()[0])

    async def record_attempt(self, due: Due, attempt: Attempt, *, state: str,
                             not_before: float | None, failures: int,
                             reason: str | None) -> None:
        """Write one attempt and the delivery's new state; resolves once committed.

        Outcomes that reach the writer together are written in bulk (Writer.record_group);
        they wait up to 2 ms for each other (Store._call).
        """
        await self._call(RecordJob(   # (positional: keywords cost a NamedTuple 2x)
            self.clock(), due.seq, due.event_seq, due.attempts + 1, attempt.at,
            attempt.duration, attempt.status_code, attempt.error, attempt.excerpt, state,
            not_before if not_before is not None else attempt.at, failures, reason),
            urgent=False)

    async def replay(self, *, delivery_ids: Sequence[str] = (), destination: str | None = None,
                     failed_since: float | None = None) -> list[str]:
        """Put failed deliveries back to pending, due now, with fresh retry windows.

        Selects by ids, or by destination and/or failure time; returns the ids replayed.
        """
        result: list[str] = await self._call(ReplayJob(self.clock(), list(delivery_ids), destination,
                                          failed_since))
        return result

    async def add_held(self, destinations: Sequence[str], seconds: float) -> int:
        """Credit ``seconds`` of host suspension to the retry window of every delivery of these
        destinations that has started retrying (held time must not use up retry_window)."""
        if not destinations or seconds <= 0:
            return 0
        result: int = await self._call(AddHeldJob(list(destinations), seconds))
        return result

    async def pending_by_destination(self) -> dict[str, int]:
        """How many deliveries wait, per destination."""
        rows = await self._read(lambda conn: conn.execute(
            "SELECT destination, COUNT(*) FROM deliveries WHERE state = 'pending' "
            "GROUP BY destination").fetchall(), lane="api")
        return dict(rows)

    async def oldest_due(self, now: float) -> float | None:
        """``not_before`` of the longest-waiting due delivery, or None when nothing is due."""
        oldest: float | None = await self._read(
            lambda conn: conn.execute(_OLDEST).fetchone()[0], lane="api")
        return oldest if oldest is not None and oldest <= now else None
