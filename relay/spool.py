"""The durable spool: every accepted event and each of its deliveries, in one SQLite file.

One writer thread owns the write connection and runs *group commit*: it takes every job that
queued while the previous transaction was committing and runs them all in one transaction (each
in its own savepoint, so one failing job does not undo the others), then one fsync. Callers
await an asyncio future that resolves only after COMMIT returns, so a 202 is never sent for data
that a SIGKILL could lose. Reads use a second connection on a reader thread (WAL lets them run
beside writes). The event loop never touches the disk.

A delivery row is the unit of work: (event, destination) with ``state`` (pending, delivered,
failed, skipped), ``attempts`` and ``not_before``. Retries are a new ``not_before``, written here;
nothing sleeps in memory waiting to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from relay import ids
from relay.errors import SpoolError, SpoolFull
from relay.events import Accepted
from relay.routing import Route

log = logging.getLogger("relay.spool")

T = TypeVar("T")
SCHEMA_VERSION = 1
MAX_GROUP = 512  # jobs per transaction: bounds the latency one group adds to the next

SCHEMA = """
CREATE TABLE events(
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL,              -- the sender's id, or one the relay generated
    sender_id   INTEGER NOT NULL,           -- 1: id is the sender's idempotency key
    received_at REAL NOT NULL,
    pending     INTEGER NOT NULL,           -- deliveries of this event not yet finished
    deliveries  TEXT NOT NULL,              -- 'destination delivery_id state|...' as created
    body        TEXT NOT NULL               -- the normalised event JSON
);
CREATE INDEX events_by_sender_id ON events(id) WHERE sender_id = 1;
CREATE INDEX events_by_time ON events(received_at);

CREATE TABLE deliveries(
    seq         INTEGER PRIMARY KEY,
    delivery_id TEXT NOT NULL UNIQUE,       -- Webhook-Id: stable across retries
    event_seq   INTEGER NOT NULL REFERENCES events(seq),
    destination TEXT NOT NULL,
    state       TEXT NOT NULL,              -- pending | delivered | failed | skipped
    attempts    INTEGER NOT NULL DEFAULT 0, -- requests tried (or render failures)
    failures    INTEGER NOT NULL DEFAULT 0, -- retryable responses (5xx, 408, 429): max_retries
    first_attempt_at REAL,                  -- start of the retry windows
    not_before  REAL NOT NULL,              -- not attempted before this unix time
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    reason      TEXT                        -- why skipped / failed, for the activity log
);
CREATE INDEX deliveries_due ON deliveries(not_before, seq) WHERE state = 'pending';

CREATE TABLE attempts(
    delivery_seq INTEGER NOT NULL,
    n            INTEGER NOT NULL,
    at           REAL NOT NULL,
    duration     REAL,
    status_code  INTEGER,
    error        TEXT,
    excerpt      TEXT,
    PRIMARY KEY (delivery_seq, n)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Ingested:
    """What the spool did with one accepted event."""

    id: str
    duplicate: bool
    deliveries: list[tuple[str, str, str]]  # (destination, delivery_id, state)


@dataclass(frozen=True, slots=True)
class Due:
    """A pending delivery whose time has come, with the event it carries."""

    seq: int
    delivery_id: str
    destination: str
    attempts: int
    failures: int
    first_attempt_at: float | None
    event_seq: int
    event_json: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try, as the activity log shows it."""

    at: float
    duration: float | None
    status_code: int | None
    error: str | None
    excerpt: str | None

    def to_json(self) -> dict[str, Any]:
        return {"at": _iso(self.at),
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
            "next_attempt_at": _iso(self.not_before) if self.state == "pending" else None,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "reason": self.reason,
        }


class _Job:
    """A unit of work for the writer: ``fn(conn)``, or (when ``events`` is set) an ingest."""

    __slots__ = ("events", "fn", "future")

    def __init__(self, future: asyncio.Future[Any], fn: Callable[[sqlite3.Connection], Any] | None,
                 events: Sequence[tuple[Accepted, Sequence[Route]]] | None = None) -> None:
        self.future = future
        self.fn = fn
        self.events = events


_STOP = object()


class Spool:
    """Durable store of events and deliveries; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_events: int = 1_000_000,
        dedupe_window: float = 86400.0,
        sync: str = "full",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.max_events = max_events
        self.dedupe_window = dedupe_window
        self.sync = sync
        self.clock = clock
        self.open_events = 0          # events with at least one pending delivery (writer-owned)
        self._next_seq = 1            # next events.seq (writer-owned)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-spool-read")
        self._read_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.is_open = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the file, migrate the schema, and start the writer thread."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._writer = threading.Thread(target=self._run_writer, args=(ready,),
                                        name="relay-spool-write", daemon=True)
        self._writer.start()
        await ready
        await self._read(lambda conn: None)
        self.is_open = True

    async def close(self) -> None:
        """Finish every queued job, commit, and close both connections."""
        if self._writer is None:
            return
        self.is_open = False
        self._jobs.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._writer = None
        await self._read(self._close_reader)
        self._reader.shutdown(wait=True)

    # -- writes (group-committed) ----------------------------------------------------------

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn(conn)`` in the next group transaction; resolves once it is committed."""
        if self._writer is None or self._loop is None:
            raise SpoolError("the spool is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put(_Job(future, fn))
        return future

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

    async def prune(self, retention: float) -> int:
        """Delete finished events (and their deliveries and attempts) older than ``retention``."""
        cutoff = self.clock() - retention

        def prune(conn: sqlite3.Connection) -> int:
            seqs = [r[0] for r in conn.execute(
                "SELECT seq FROM events WHERE received_at < ? AND pending = 0 LIMIT 10000",
                (cutoff,))]
            if not seqs:
                return 0
            marks = ",".join("?" * len(seqs))
            conn.execute(f"DELETE FROM attempts WHERE delivery_seq IN (SELECT seq FROM deliveries "
                         f"WHERE event_seq IN ({marks}))", seqs)
            conn.execute(f"DELETE FROM deliveries WHERE event_seq IN ({marks})", seqs)
            conn.execute(f"DELETE FROM events WHERE seq IN ({marks})", seqs)
            return len(seqs)

        return await self.submit(prune)

    # -- reads -----------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            if self._read_conn is None:
                self._read_conn = _connect(self.path)
            try:
                return fn(self._read_conn)
            except sqlite3.Error as exc:
                raise SpoolError(f"spool read failed: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)

    def _close_reader(self, conn: sqlite3.Connection) -> None:
        conn.close()
        self._read_conn = None

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        rows = await self._read(lambda conn: conn.execute(
            _SELECT_DELIVERY + " WHERE d.delivery_id = ?", (delivery_id,)).fetchall())
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
        where, args = ["d.seq > ?"], [after]
        if state is not None:
            where.append("d.state = ?")
            args.append(state)
        if destination is not None:
            where.append("d.destination = ?")
            args.append(destination)
        sql = f"{_SELECT_DELIVERY} WHERE {' AND '.join(where)} ORDER BY d.seq LIMIT ?"
        rows = await self._read(lambda conn: conn.execute(sql, (*args, limit)).fetchall())
        return [DeliveryRecord(*row) for row in rows]

    # -- the dispatcher's side -----------------------------------------------------------

    async def due(self, now: float, limit: int, destinations: Sequence[str],
                  exclude: Collection[int] = ()) -> list[Due]:
        """Pending deliveries due by ``now`` for these destinations, oldest first."""
        if not destinations or limit <= 0:
            return []
        where, args = self._pending_filter(destinations, exclude)
        sql = ("SELECT d.seq, d.delivery_id, d.destination, d.attempts, d.failures, "
               "d.first_attempt_at, d.event_seq, e.body FROM deliveries d "
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
        """Write one attempt and the delivery's new state; resolves once committed."""
        def write(conn: sqlite3.Connection) -> None:
            n = due.attempts + 1
            conn.execute(
                "INSERT INTO attempts(delivery_seq, n, at, duration, status_code, error, excerpt) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (due.seq, n, attempt.at, attempt.duration, attempt.status_code, attempt.error,
                 attempt.excerpt))
            conn.execute(
                "UPDATE deliveries SET attempts = ?, failures = ?, state = ?, not_before = ?, "
                "updated_at = ?, first_attempt_at = COALESCE(first_attempt_at, ?), reason = ? "
                "WHERE seq = ?",
                (n, failures, state, not_before if not_before is not None else attempt.at,
                 self.clock(), attempt.at, reason, due.seq))
            if state != "pending":
                self._finish_one(conn, due.event_seq)

        await self.submit(write)

    def _finish_one(self, conn: sqlite3.Connection, event_seq: int) -> None:
        left = conn.execute("UPDATE events SET pending = pending - 1 WHERE seq = ? "
                            "RETURNING pending", (event_seq,)).fetchone()
        if left is not None and left[0] == 0:
            self.open_events -= 1

    async def replay(self, *, delivery_ids: Sequence[str] = (), destination: str | None = None,
                     failed_since: float | None = None) -> list[str]:
        """Put failed deliveries back to pending, due now, with fresh retry windows.

        Selects by ids, or by destination and/or failure time; returns the ids replayed.
        """
        def write(conn: sqlite3.Connection) -> list[str]:
            where, args = ["state = 'failed'"], []
            if delivery_ids:
                where.append(f"delivery_id IN ({','.join('?' * len(delivery_ids))})")
                args += list(delivery_ids)
            if destination is not None:
                where.append("destination = ?")
                args.append(destination)
            if failed_since is not None:
                where.append("updated_at >= ?")
                args.append(failed_since)
            rows = conn.execute(f"SELECT seq, delivery_id, event_seq FROM deliveries WHERE "
                                f"{' AND '.join(where)} LIMIT 100000", args).fetchall()
            now = self.clock()
            for seq, _, event_seq in rows:
                conn.execute("UPDATE deliveries SET state = 'pending', not_before = ?, "
                             "failures = 0, first_attempt_at = NULL, reason = NULL, "
                             "updated_at = ? WHERE seq = ?", (now, now, seq))
                before = conn.execute("UPDATE events SET pending = pending + 1 WHERE seq = ? "
                                      "RETURNING pending", (event_seq,)).fetchone()
                if before is not None and before[0] == 1:
                    self.open_events += 1
            return [delivery_id for _, delivery_id, _ in rows]

        return await self.submit(write)

    async def attempts_of(self, seqs: Sequence[int]) -> dict[int, list[Attempt]]:
        """Attempts of these deliveries (by seq), oldest first."""
        if not seqs:
            return {}
        sql = (f"SELECT delivery_seq, at, duration, status_code, error, excerpt FROM attempts "
               f"WHERE delivery_seq IN ({','.join('?' * len(seqs))}) ORDER BY delivery_seq, n")
        rows = await self._read(lambda conn: conn.execute(sql, list(seqs)).fetchall())
        found: dict[int, list[Attempt]] = {}
        for seq, *fields in rows:
            found.setdefault(seq, []).append(Attempt(*fields))
        return found

    async def event_json(self, delivery_id: str) -> str | None:
        """The stored event (normalised JSON) behind a delivery."""
        rows = await self._read(lambda conn: conn.execute(
            "SELECT e.body FROM deliveries d JOIN events e ON e.seq = d.event_seq "
            "WHERE d.delivery_id = ?", (delivery_id,)).fetchall())
        return rows[0][0] if rows else None

    async def counts(self) -> dict[str, int]:
        """Number of deliveries by state."""
        rows = await self._read(lambda conn: conn.execute(
            "SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())
        return {state: n for state, n in rows}

    # -- the writer thread -----------------------------------------------------------------

    def _run_writer(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = _connect(self.path, self.sync)
            _migrate(conn)
            self.open_events = conn.execute(
                "SELECT COUNT(*) FROM events WHERE pending > 0").fetchone()[0]
            self._next_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events").fetchone()[0]
        except (sqlite3.Error, OSError, SpoolError) as exc:
            error = exc if isinstance(exc, SpoolError) else \
                SpoolError(f"cannot open spool {self.path}: {exc}")
            self._loop.call_soon_threadsafe(_settle, [(ready, None, error)])
            return
        self._loop.call_soon_threadsafe(_settle, [(ready, None, None)])
        stopping = False
        while not stopping:
            jobs = [self._jobs.get()]
            while len(jobs) < MAX_GROUP:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if _STOP in jobs:
                stopping = True
                jobs = [j for j in jobs if j is not _STOP]
            if jobs:
                self._loop.call_soon_threadsafe(_settle, self._run_group(conn, jobs))
        conn.close()

    def _run_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[Any, ...]]:
        outcomes: list[tuple[Any, ...]] = []
        open_before, seq_before = self.open_events, self._next_seq
        try:
            conn.execute("BEGIN IMMEDIATE")
            ingests = [job for job in jobs if job.events is not None]
            if ingests:
                outcomes += self._ingest_group(conn, ingests)
            for job in jobs:
                if job.fn is None:
                    continue
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((job.future, job.fn(conn), None))
                    conn.execute("RELEASE job")
                except Exception as exc:  # each job's error goes to its caller
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((job.future, None, _map_error(exc)))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Nothing of this group is on disk: every job fails, and in-memory counts rewind.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.open_events, self._next_seq = open_before, seq_before
            error = _map_error(exc)
            log.error("spool commit failed: %s", exc)
            return [(job.future, None, error) for job in jobs]
        return outcomes


_SELECT_DELIVERY = (
    "SELECT d.delivery_id, e.id, d.destination, d.state, d.attempts, d.not_before, d.created_at, "
    "d.updated_at, d.reason, d.seq FROM deliveries d JOIN events e ON e.seq = d.event_seq")


def _pack(deliveries: list[tuple[str, str, str]]) -> str:
    """``[(destination, delivery_id, state)]`` as ``dest id state|...`` (names have no spaces
    or bars: config restricts them), several times cheaper than JSON on the ingest path."""
    return "|".join(f"{d} {i} {s}" for d, i, s in deliveries)


def _unpack(listing: str) -> list[tuple[str, str, str]]:
    return [tuple(part.split(" ", 2)) for part in listing.split("|")] if listing else []  # type: ignore[misc]


def _settle(outcomes: list[tuple[Any, ...]]) -> None:
    """Resolve the futures of one committed group (runs on the event loop)."""
    for future, result, error in outcomes:
        if future.done():  # the caller went away (cancelled); the data is committed anyway
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _map_error(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            return SpoolFull("the disk holding the spool is full", retry_after=30)
        return SpoolError(f"spool write failed: {exc}")
    return exc


def _connect(path: str, sync: str = "full") -> sqlite3.Connection:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit is fsynced, so an acknowledged event survives power loss, not only
        # a process crash. Group commit pays for one fsync per group, not per request.
        # NORMAL (WAL): a commit reaches the OS before it returns, so it survives SIGKILL.
        conn.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn
    except (sqlite3.Error, OSError) as exc:
        raise SpoolError(f"cannot open spool {path}: {exc}") from exc


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise SpoolError(f"the spool was written by a newer relay (schema {version}, this relay "
                         f"knows {SCHEMA_VERSION}); upgrade the relay or use another spool.path")
    conn.executescript("BEGIN;" + SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
