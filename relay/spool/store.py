"""The spool's engine: one SQLite file, a writer thread with group commit, a reader thread.

One writer thread owns the write connection and runs *group commit*: it takes every job that
queued while the previous transaction was committing and runs them all in one transaction (each
generic job in its own savepoint, so one failing job does not undo the others; ingest jobs in
bulk), then one fsync. Callers await an asyncio future that resolves only after COMMIT returns,
so a 202 is never sent for data that a SIGKILL could lose. Reads use a second connection on a
reader thread (WAL lets them run beside writes). The event loop never touches the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
    held        REAL NOT NULL DEFAULT 0,    -- seconds its host was suspended since then
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


class _Job:
    """A unit of work for the writer: ``fn(conn)``; or, run in bulk with others of its kind,
    an ingest (``events``) or an attempt outcome (``outcome``)."""

    __slots__ = ("events", "fn", "future", "outcome")

    def __init__(self, future: asyncio.Future[Any], fn: Callable[[sqlite3.Connection], Any] | None,
                 events: Sequence[tuple[Accepted, Sequence[Route]]] | None = None,
                 outcome: tuple[Any, ...] | None = None) -> None:
        self.future = future
        self.fn = fn
        self.events = events
        self.outcome = outcome


_STOP = object()


class Store:
    """Connections, threads and transactions; the Spool's operations are built on these."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_events: int = 1_000_000,
        dedupe_window: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.max_events = max_events
        self.dedupe_window = dedupe_window
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

    # -- the writer thread -----------------------------------------------------------------

    def _run_writer(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = _connect(self.path)
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
            records = [job for job in jobs if job.outcome is not None]
            if records:
                outcomes += self._record_group(conn, records)
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

    def _ingest_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # provided by the ingest part of Spool

    def _record_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # provided by the queue part of Spool


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


def _connect(path: str) -> sqlite3.Connection:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit is fsynced, so an acknowledged event survives power loss, not only
        # a process crash. Group commit pays for one fsync per group, not per request.
        conn.execute("PRAGMA synchronous=FULL")
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
