"""The spool on PostgreSQL: the SQLite spool's guarantees on a database that outlives the pod.

Same public API as ``relay.spool.Spool`` (the server, dispatcher and API cannot tell them
apart), same receipt JSON, same delivery ids (relay.ids).

Driver: asyncpg. It is an asyncio driver speaking PostgreSQL's binary protocol directly (no
libpq, no thread pool), the fastest Python driver in every published comparison, with prepared
statements cached per connection, and arrays bound as parameters: a whole group becomes one
``unnest(...)`` statement, whatever its size, and the statement text never changes.

Guarantees, as in the SQLite spool:

* Durable on 202: ``ingest_receipt`` resolves after COMMIT (synchronous_commit as the server
  has it; the default, on, flushes the WAL before COMMIT returns).
* Group commit, in two lanes: every ingest queued while the previous ingest group ran goes
  into the next one, and so does every attempt outcome in its own lane, written with set-based
  statements (postgres_sql.py): the outcomes in one statement (on a connection that does not
  wait for the WAL flush, as SQLite's writer does for them), the ingests in one more
  (``INGEST``: the dedupe claim and the insert of events with their deliveries), or, when a
  sender id repeats or spool.max_events would be passed, in a transaction of a dedupe upsert
  and one insert. Each request stays all or nothing: one refused for spool.max_events adds no
  rows. A sender's 202 never waits behind a group of outcomes.
* Dedupe by a unique key: ``sender_ids`` is upserted (``ON CONFLICT``), replacing a row only
  when it is older than spool.dedupe_window, so a repeat after the window is stored again.
* A lost database connection is not a crash: jobs fail with SpoolError (the server answers 503
  with Retry-After), ``writable`` turns False (``/readyz`` says so), reads raise SpoolError, a
  probe retries every ``PROBE_EVERY`` seconds, and the pool reconnects when the database returns.

For several replicas on one database (issue 17), ``due()`` claims rows with ``FOR UPDATE SKIP
LOCKED`` and a lease (``lease_owner``: this replica's id, ``RELAY_REPLICA_ID`` or
hostname:pid; ``lease_until``), and ``record_attempt`` applies only while the lease is ours.
``close()`` releases this replica's claims (and logs how many are left for the others);
``prune()`` runs on one replica at a time (``pg_try_advisory_xact_lock``); host health is shared
through the ``hosts`` table (relay/health_shared.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import asyncpg

from relay.errors import SpoolError, SpoolFull
from relay.ids import delivery_id_prefix, random_part
from relay.spool import postgres_sql as sql
from relay.spool.postgres_schema import migrate, quote_ident
from relay.spool.receipt import pack, receipt_entry, unpack
from relay.spool.records import (
    DUE_BUDGET,
    Attempt,
    DeliveryRecord,
    Due,
    DueBatch,
    Ingested,
    Receipt,
)

if TYPE_CHECKING:
    from relay.events import Accepted
    from relay.routing import Route

log = logging.getLogger("relay.spool")
DSN_UNPARSABLE = ("spool.postgres.dsn is not a URL PostgreSQL's client can read (a password "
                  "holding / # ? @ or : must be percent-encoded: / as %2F, # as %23)")


def _storable(text: str | None) -> str | None:
    """``text`` as PostgreSQL's text can hold it: U+FFFD for each NUL. A receiver's answer is
    anything (binary, UTF-16); one NUL in an excerpt made its outcome impossible to write, and
    dispatching waited for it for good."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text

MAX_GROUP = 512          # jobs per transaction, as in the SQLite writer
LANES = ("ingest", "record")   # a group writer each: a group of ingests at a time (a second
                         # only beside a large one: EXTRA_GROUP_EVENTS), and beside it a group
                         # of outcomes, which nobody answers a sender for (docs/performance.md)
# A second ingest group may run beside the one in flight, once this many events wait for it
# (batches): the event loop then makes one group's statement while PostgreSQL runs the other's,
# where a group at a time left each idle half the time (bench/ingest.py, batches of 100: 8,600
# -> 13,200 events/s). Fewer events waiting (single events from up to 128 connections) keep to
# one group at a time: a group's fixed cost is the event loop's, which they are bound by (two
# at once measured 5-20 % slower).
EXTRA_GROUP_EVENTS = 128
EXTRA_WRITER_POOL = 4    # connections the ingest pool needs for the second ingest writer:
                         # it never leaves fewer free than one writer did, less one
PROBE_EVERY = 0.5        # seconds between reconnect attempts while the database is unreachable
LIGHT_CONNECTIONS = 2    # of pool_size: for claims and outcomes (no WAL flush); one of
                         # them stays free for claims while the writer's outcome waits
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
# SQLSTATE classes that mean "the database went away", not "this statement is wrong":
# 08 connection exception, 57 operator intervention (shutdown), 53 insufficient resources.
_DOWN_CLASSES = ("08", "57", "53")
# SQLSTATEs of a transaction PostgreSQL aborted to let another one through (a deadlock between
# replicas' groups, a serialization failure): run again, it goes through.
_ABORTED = ("40P01", "40001")
GROUP_TRIES = 3
# Seconds before a look again when due deliveries were left unclaimed because another
# transaction held them locked (PostgresSpool.poll): a look that claimed none of its
# candidates, or found the rows it left still due on a second read.
LOCKED_RECHECK = 0.02
# Session settings of the claim and outcome connections (commits not waiting for the WAL
# flush), beside search_path and jit. PostgreSQL has no plan hints, and the spool's tables grow
# by thousands of rows a second, faster than autovacuum's ANALYZE (a minute apart at best)
# describes them. A claim must walk deliveries_due (one destination at a time, postgres_sql
# _CLAIMED) and stop after its limit, and the other replicas' leases must be read from
# deliveries_leased, whatever the statistics say: with none yet (a new spool), or with
# statistics from a quiet hour (few pending rows), the planner read every pending delivery
# into a bitmap and sorted them, or read the whole table, for every look: 60-100 ms a look at
# a backlog of 60,000, just when a receiver comes back. Without sequential and bitmap scans
# and sorts, the index walks are the plans left (a table with no usable index, the one-row
# counters, is still scanned; the claim's sorts of its few hundred candidates, which no plan
# avoids, still run); the outcomes' statement joins on primary keys and groups by hashing.
LIGHT_SETTINGS = {
    "synchronous_commit": "off",
    "enable_seqscan": "off",
    "enable_bitmapscan": "off",
    "enable_sort": "off",
}


class _Aborted(SpoolError):
    """PostgreSQL aborted the group's transaction to break a deadlock: nothing of it is stored,
    and running it again succeeds."""


class _PoolBusy(SpoolError):
    """Every connection of the pool stayed in use (statements waiting on locks): running a
    group's jobs again one by one would only wait again."""


class _Committed(Exception):
    """A group's statement committed, and making its answers raised (the cause): its jobs
    must not run again."""


def replica_id() -> str:
    """This replica's name in ``lease_owner``: RELAY_REPLICA_ID, else hostname:pid."""
    return os.environ.get("RELAY_REPLICA_ID") or f"{socket.gethostname()}:{os.getpid()}"


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Nothing to reset on release (see PostgresSpool._create_pool)."""


@dataclass(slots=True)
class _Job:
    args: Any
    future: asyncio.Future[Any] = field(repr=False)


class PostgresSpool:
    """Durable store of events and deliveries in PostgreSQL; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "relay",
        pool_size: int = 10,
        lease: float = 120.0,
        max_events: int = 1_000_000,
        dedupe_window: float = 86400.0,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self.lease = lease
        self.max_events = max_events
        self.dedupe_window = dedupe_window
        self.replica = replica or replica_id()
        self.clock = clock
        self.is_open = False
        self.groups = 0             # groups run by the group writers since open()
        # Set by the service to its dispatcher's offer_mark: called as each ingest is queued
        # with how many pending deliveries it has per destination; (number, {destination:
        # n}) means "store the first n deliveries of each such destination leased to this
        # replica and offer them" (the receipt carries their rows and the number; no other
        # replica can claim them); None, or the rest: stored for any replica to claim.
        self.offers: Callable[[Mapping[str, int]], tuple[int, dict[str, int]] | None] | None = None
        self._pool: asyncpg.Pool | None = None
        self._light: asyncpg.Pool | None = None   # synchronous_commit off: see _fetch_lightly
        self._jobs: dict[str, deque[_Job]] = {lane: deque() for lane in LANES}
        self._queued: dict[str, int] = {lane: 0 for lane in LANES}   # their events (ingest)
        self._wake: dict[str, asyncio.Event] = {lane: asyncio.Event() for lane in LANES}
        self._writers: list[asyncio.Task[None]] = []
        self._probe: asyncio.Task[None] | None = None
        self._closing = False
        self._up = False
        self._down_reason: str | None = None

    @property
    def writable(self) -> bool:
        """The database answers and the spool takes jobs (False while it is unreachable)."""
        return self._up and self.is_open and not self._closing

    @property
    def unavailable(self) -> str | None:
        if self._closing or not self.is_open:
            return "the spool is closed"
        return None if self._up else (f"the spool database is unreachable "
                                      f"({self._down_reason or 'no answer'}); retrying")

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create or migrate the schema (one replica at a time), start the writer."""
        self._closing = False
        try:
            conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise SpoolError(f"cannot connect to spool.postgres.dsn: {exc}") from exc
        except ValueError:   # asyncpg's parser, whose message can quote the password
            raise SpoolError(DSN_UNPARSABLE) from None
        try:
            await migrate(conn, self.schema)
        except asyncpg.PostgresError as exc:
            raise SpoolError(f"cannot migrate spool schema {self.schema!r}: {exc}") from exc
        finally:
            await conn.close()
        settings = {"search_path": quote_ident(self.schema), "jit": "off"}
        try:
            self._pool = await self._create_pool(max(1, self.pool_size - LIGHT_CONNECTIONS),
                                                 settings)
            self._light = await self._create_pool(LIGHT_CONNECTIONS,
                                                  {**settings, **LIGHT_SETTINGS})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
            raise SpoolError(f"cannot connect to spool.postgres.dsn: {exc}") from exc
        self._up = True
        self.is_open = True
        # An ingest group and an outcome group in flight at once, and a second ingest group
        # beside a large one (concurrent transactions are safe here as they are between
        # replicas; they meet on the counters row and on a sender id both hold).
        self._writers = [asyncio.create_task(self._write_forever(lane),
                                             name=f"relay-spool-pg-writer-{lane}")
                         for lane in LANES]
        if self.pool_size - LIGHT_CONNECTIONS >= EXTRA_WRITER_POOL:
            self._writers.append(asyncio.create_task(
                self._write_forever("ingest", beside=True), name="relay-spool-pg-writer-ingest-2"))

    async def _create_pool(self, size: int, settings: dict[str, str]) -> asyncpg.Pool:
        # reset: asyncpg's default sends "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN
        # *; RESET ALL" on every release, a round trip per group and per claim. Pooled
        # connections here take only transaction-scoped locks and settings, open no cursors and
        # listen to nothing, so there is nothing to reset; asyncpg still rolls back a
        # transaction left open.
        return await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=size, timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT, server_settings=settings, reset=_no_reset)

    async def close(self) -> None:
        """Commit every queued job, release this replica's leases, close the pools."""
        if self._pool is None:
            return
        self._closing = True
        for wake in self._wake.values():
            wake.set()
        await asyncio.gather(*self._writers)
        self._writers = []
        for task in (self._probe,):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(SpoolError):
            async with self._connection() as conn:
                released = await conn.fetchval(sql.RELEASE, self.replica)
                pending = await conn.fetchval(sql.PENDING)
            # Claims given back, not left to expire: the other replicas take them at once.
            log.info("replica %s released %d claimed deliveries; %d deliveries pending for the "
                     "other replicas", self.replica, released, pending)
        self.is_open = False
        pools, self._pool, self._light = (self._pool, self._light), None, None
        for pool in pools:
            if pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), COMMAND_TIMEOUT)
        self._up = False

    # -- connections and failures ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self, light: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (``light``: one whose commits do not wait for the WAL flush);
        database errors become SpoolError, and a lost database marks the spool unwritable
        until the probe reaches it again."""
        pool = self._light if light else self._pool
        if pool is None:
            raise SpoolError("the spool is closed")
        acquired = False
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                acquired = True
                yield conn
        except SpoolError:
            raise
        except asyncpg.PostgresError as exc:
            if exc.sqlstate in _ABORTED:
                raise _Aborted(f"spool transaction aborted by the database: {exc}") from exc
            if (exc.sqlstate or "")[:2] in _DOWN_CLASSES:
                self._lost(exc)
                raise SpoolError(f"the spool database is unreachable: {exc}") from exc
            raise SpoolError(f"spool statement failed: {exc}") from exc
        except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                TimeoutError) as exc:
            # (InternalClientError: a connection the database dropped mid-statement, "cannot
            # switch to state 12; another operation is in progress": as lost as the others)
            if isinstance(exc, TimeoutError) and not acquired and pool.get_idle_size() == 0 \
                    and pool.get_size() >= pool.get_max_size():
                # every connection is in use (statements waiting on locks): busy, not lost
                raise _PoolBusy(f"all {pool.get_max_size()} spool connections stayed busy for "
                                f"{CONNECT_TIMEOUT:g}s") from exc
            self._lost(exc)
            raise SpoolError(f"the spool database is unreachable: {self._down_reason}") from exc

    def _lost(self, exc: BaseException) -> None:
        self._down_reason = str(exc) or type(exc).__name__
        if self._up:
            # (str() of a TimeoutError is empty: its type says what happened)
            log.error("the spool database is unreachable (%s); ingest answers 503 until it returns",
                      self._down_reason)
        self._up = False
        if (self._probe is None or self._probe.done()) and not self._closing:
            self._probe = asyncio.create_task(self._reconnect(), name="relay-spool-pg-probe")

    async def _reconnect(self) -> None:
        while not self._closing and self._pool is not None:
            await asyncio.sleep(PROBE_EVERY)
            for pool in (self._pool, self._light):  # connections from before the loss are dead
                if pool is not None:
                    await pool.expire_connections()
            try:
                async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                    await conn.fetchval("SELECT 1")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                continue
            self._up = True
            log.warning("the spool database is reachable again")
            return

    def _check_writable(self) -> None:
        if self._pool is None or self._closing:
            raise SpoolError("the spool is closed")
        if not self._up:
            raise SpoolError("the spool database is unreachable")

    async def work_mark(self) -> tuple[int, int]:
        """(newest event seq, counters.released): changes when any replica stores events,
        records a retry, replays or gives claims back at close, so a replica whose last look
        was complete looks again."""
        row = (await self._fetch(sql.WORK_MARK))[0]
        return (row[0] or 0, row[1])

    async def fetch_rows(self, query: str, *args: Any) -> list[Any]:
        """Run one statement on the spool's schema (for modules sharing this database, such
        as relay/health_shared.py), committed without waiting for the WAL flush: for state
        whose loss in a crash costs nothing. Database errors become SpoolError."""
        return await self._fetch_lightly(query, *args)

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        async with self._connection() as conn:
            return list(await conn.fetch(query, *args))

    async def _fetch_lightly(self, query: str, *args: Any) -> list[Any]:
        """``_fetch`` on a connection whose commits do not wait for the WAL flush
        (synchronous_commit off for its session): for claims and shared host health. A claim
        lost in a crash costs nothing (the row is simply claimable again), and an fsync per
        due batch measured as a fifth of the delivery path's time. One statement, one round
        trip (it was four: BEGIN, SET LOCAL, the statement, COMMIT)."""
        async with self._connection(light=True) as conn:
            return list(await conn.fetch(query, *args))

    async def _fetchval(self, query: str, *args: Any) -> Any:
        async with self._connection() as conn:
            return await conn.fetchval(query, *args)

    # -- group commit ----------------------------------------------------------------------

    def _submit(self, kind: str, args: Any) -> asyncio.Future[Any]:
        self._check_writable()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs[kind].append(_Job(args, future))
        self._queued[kind] += _rows(kind, args)
        self._wake[kind].set()
        return future

    async def _write_forever(self, lane: str, beside: bool = False) -> None:
        """Take every job of ``lane`` queued while its previous group ran; run them as one
        group (one statement in the common case: see _ingest_group), committed on its own.
        ``beside``: the second ingest writer, which starts a group only once
        EXTRA_GROUP_EVENTS events wait (the first is busy with a group of its own then), and
        only with a connection to spare: it never waits for one (what it leaves, the first
        writer takes next)."""
        jobs, wake = self._jobs[lane], self._wake[lane]
        while True:
            if not jobs or (beside and (self._queued[lane] < EXTRA_GROUP_EVENTS
                                        or not self._spare_connections())):
                if self._closing and (beside or not jobs):
                    return   # (the first writer commits what is left)
                wake.clear()
                await wake.wait()
                continue
            group = [jobs.popleft() for _ in range(min(MAX_GROUP, len(jobs)))]
            self._queued[lane] -= sum(_rows(lane, job.args) for job in group)
            self.groups += 1
            await self._run_part(lane, group)

    async def _run_part(self, kind: str, jobs: list[_Job]) -> None:
        try:
            try:
                answers = await self._commit_part(kind, jobs)
            except (SpoolError, asyncio.CancelledError):
                raise
            except _Committed as exc:
                # Its rows are in: running its jobs again would store every event without a
                # sender id twice. They fail as a commit whose answer was lost does.
                log.error("spool %s group committed, then its answers failed", kind,
                          exc_info=exc.__cause__)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(SpoolError(
                            f"the spool stored this request but could not answer for it: "
                            f"{exc.__cause__!r}"))
                return
            except Exception as exc:
                # Never the end of this lane's writer: its callers wait for it (a dead outcome
                # writer once held every request slot for good, /readyz still ready).
                log.exception("spool %s group failed", kind)
                raise SpoolError(f"spool write failed: {type(exc).__name__}: {exc}") from exc
        except SpoolError as exc:
            if len(jobs) > 1 and self._up and not isinstance(exc, _PoolBusy):
                # a statement error, not a lost database: find the job that causes it; the
                # others go through
                for job in jobs:
                    await self._run_part(kind, [job])
                return
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(SpoolError(str(exc)))
            return
        for job, (error, result) in zip(jobs, answers, strict=True):
            if job.future.done():
                continue  # the caller went away; the data is committed
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def _spare_connections(self) -> bool:
        """The ingest pool has two connections free (idle or yet to be opened): one for a
        second group, one left for reads and claims."""
        pool = self._pool
        return pool is not None and \
            pool.get_idle_size() + pool.get_max_size() - pool.get_size() >= 2

    async def _commit_part(self, kind: str,
                           jobs: list[_Job]) -> list[tuple[Exception | None, Any]]:
        """Run again when PostgreSQL aborted it to break a deadlock (replicas' groups lock
        sender ids, events and the counters row: a lone ingest that lost such a deadlock
        answered 503). Outcomes go on a connection that does not wait for the WAL flush: one
        lost in a crash of the database means its delivery is sent again with the same
        Webhook-Id, which at-least-once allows (as in the SQLite writer); the next ingest's
        commit flushes it with everything before it."""
        tries = 1
        while True:
            try:
                async with self._connection(light=kind == "record") as conn:
                    if kind == "record":
                        await self._record_group(conn, [job.args for job in jobs])
                        return [(None, None)] * len(jobs)
                    return await self._ingest_group(conn, jobs)
            except _Aborted as exc:
                if tries == GROUP_TRIES:
                    raise
                tries += 1
                log.info("%s; running the group of %d jobs again", exc, len(jobs))

    async def _ingest_group(self, conn: asyncpg.Connection,
                            jobs: list[_Job]) -> list[tuple[Exception | None, Any]]:
        """Every ingest of a group. Usually one statement (sql.INGEST, committed on its own):
        it stores everything unless a sender id is a repeat or spool.max_events would be
        passed, and then writes nothing; the group then runs as a transaction of a dedupe
        upsert and one insert, refusing requests one by one (_ingest_checked)."""
        plan = _plan(jobs, self.lease)
        hopeful = _assemble(jobs, plan, set(plan.claim[0]), {}, None, self.max_events)
        claimed: set[str] = set()
        leased: dict[str, str] = {}
        written = False
        for kind, key, value in await conn.fetch(
                sql.INGEST, *plan.claim, plan.since, *hopeful.events, *hopeful.deliveries,
                self.replica, hopeful.total_open, self.max_events):
            if kind == "c":
                claimed.add(key)
            elif kind == "l":
                leased[key] = value
            elif kind == "w":
                written = True
        if not written:
            async with conn.transaction():
                return await self._ingest_checked(conn, jobs, plan)
        try:
            return await self._ingest_written(conn, jobs, plan, hopeful, claimed, leased)
        except Exception as exc:
            raise _Committed() from exc

    async def _ingest_written(self, conn: asyncpg.Connection, jobs: list[_Job], plan: _Plan,
                              hopeful: _Assembled, claimed: set[str],
                              leased: dict[str, str]) -> list[tuple[Exception | None, Any]]:
        """The answers of a group sql.INGEST stored (committed: nothing here may run it
        again)."""
        raced = [i for i in plan.claim[0] if i not in claimed]
        if not raced:
            return _offered(jobs, plan, hopeful.answers, leased)
        # Another replica stored these sender ids after the statement's snapshot: their
        # events were left out. They are duplicates of what it stored. The group is committed
        # now: whatever happens next must not run it again.
        try:
            known = dict(await conn.fetch(sql.SENDER_IDS, raced))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                OSError, TimeoutError) as exc:
            known, why = {}, f"cannot read the deliveries of a repeated sender id: {exc}"
            if not isinstance(exc, asyncpg.PostgresError):
                self._lost(exc)   # as _connection would: its connections are not reused
        else:
            why = "a repeated sender id's deliveries were pruned meanwhile"
        missing = set(raced) - known.keys()   # (before _assemble adds the group's own ids)
        answers = _offered(jobs, plan, _assemble(jobs, plan, claimed, dict(known), None,
                                                 self.max_events).answers, leased)
        if not missing:
            return answers
        # Their jobs get a 503, never an answer naming deliveries that were not stored. (The
        # sender retries: its events with an id are then duplicates; one without an id is
        # stored again, as after any 503 whose commit went through.)
        return [(SpoolError(why), None)
                if any(event[0] in missing for event in job.args[2]) else answer
                for job, answer in zip(jobs, answers, strict=True)]

    async def _ingest_checked(self, conn: asyncpg.Connection, jobs: list[_Job],
                              plan: _Plan) -> list[tuple[Exception | None, Any]]:
        """The group in a transaction: claim sender ids, refuse the requests that would pass
        spool.max_events, insert the rest."""
        claimed: set[str] = set()
        known: dict[str, str] = {}                 # sender id -> deliveries listing (duplicates)
        open_events = 0
        for kind, sender, value in await conn.fetch(sql.CLAIM, *plan.claim, plan.since):
            if kind == "c":
                claimed.add(sender)
            elif kind == "d":
                known[sender] = value
            else:
                open_events = int(value)
        raced = [i for i in plan.claim[0] if i not in claimed and i not in known]
        if raced:  # inserted by a concurrent transaction that committed while we waited
            known.update(await conn.fetch(sql.SENDER_IDS, raced))
        done = _assemble(jobs, plan, claimed, known, open_events, self.max_events)
        leased: dict[str, str] = {}
        if done.events[0]:
            leased = dict(await conn.fetch(sql.INSERT, *done.events, *done.deliveries,
                                           self.replica, done.total_open))
        if done.fixes:
            await conn.execute(sql.FIX_SENDER_IDS, list(done.fixes), list(done.fixes.values()))
        return _offered(jobs, plan, done.answers, leased)

    async def _record_group(self, conn: asyncpg.Connection, outcomes: list[tuple[Any, ...]]) -> None:
        """Attempt outcomes in one statement; those whose lease another replica took since are
        left out (logged: that replica's attempt is the one that counts)."""
        cols: tuple[list[Any], ...] = tuple([] for _ in range(11))
        for outcome in outcomes:
            for col, value in zip(cols, outcome, strict=True):
                col.append(value)
        applied = {row[0] for row in await conn.fetch(sql.RECORD, self.clock(), self.replica, *cols)}
        if len(applied) < len(outcomes):
            lost = [seq for seq in cols[0] if seq not in applied]
            log.warning("%d attempt outcomes not recorded: this replica's lease on deliveries "
                        "%s had been taken over", len(lost), lost[:10])

    # -- ingest ----------------------------------------------------------------------------

    async def ingest_receipt(self, events: Sequence[tuple[Accepted, Sequence[Route]]]) -> Receipt:
        """Store events with their deliveries, all or nothing; resolves once committed.

        A sender id seen within ``dedupe_window`` is not stored again: its entry is a duplicate
        carrying the deliveries first created for it. Raises SpoolFull when ``max_events``
        events already await delivery, SpoolError when the database cannot be reached.
        """
        now = self.clock()
        offer = None
        if self.offers is not None:
            pending = Counter(r.destination for _, routes in events for r in routes
                              if r.state == "pending")
            offer = self.offers(pending) if pending else None
        return Receipt(*await self._submit("ingest", (now, now - self.dedupe_window, [
            (a.id, bool(a.sender_id), a.received_at, a.body,
             [(r.destination, r.state, r.reason) for r in routes])
            for a, routes in events], offer)))

    async def ingest(self, events: Sequence[tuple[Accepted, Sequence[Route]]]) -> list[Ingested]:
        """ingest_receipt, with the receipt as one Ingested per event."""
        return (await self.ingest_receipt(events)).entries()

    # -- the work queue --------------------------------------------------------------------

    async def due(self, now: float, limit: int, destinations: Sequence[str],
                  exclude: Collection[int] = (), budget: int = DUE_BUDGET) -> list[Due]:
        """Claim pending deliveries due by ``now`` for these destinations, oldest first (of
        each destination's share: postgres_sql._CLAIMED): rows no other replica holds an
        unexpired lease on, leased to this one for ``lease`` s.
        Claims past ``budget`` characters of event JSON (one at least) are released again."""
        return (await self._claim(sql.DUE, now, limit, destinations, exclude, budget))[0]

    async def _claim(self, statement: str, now: float, limit: int, destinations: Sequence[str],
                     exclude: Collection[int], budget: int
                     ) -> tuple[list[Due], bool, float | None, list[int], frozenset[str] | None]:
        """``due`` by ``statement`` (DUE, or LOOK); whether it claimed every row it could (none
        was given back for the budget, fewer than ``limit`` were due, and no destination gave
        its whole share of candidates: postgres_sql._CLAIMED); LOOK's next time;
        the rows given back (their lease cleared, offered ones too: see Dispatcher.offer);
        LOOK's destinations that may have more due (None if rows were given back: then any)."""
        if not destinations or limit <= 0:
            return [], False, None, [], None
        rows = await self._fetch_lightly(statement, list(destinations), list(exclude), now,
                                         self.replica, self.clock(), limit, self.lease)
        next_at, capped, more = next(((row[10], row[11], row[12]) for row in rows
                                      if row[0] is None), (None, False, None))
        rows = [row for row in rows if row[0] is not None]
        rows.sort(key=lambda row: (row[9], row[0]))
        kept: list[Any] = []
        total = 0
        for row in rows:  # as in SQLite: a row is kept while those before it fit the budget
            if total >= budget:
                break
            kept.append(row)
            total += len(row[8])
        given_back = [row[0] for row in rows[len(kept):]]
        if given_back:
            await self._fetch_lightly(sql.UNCLAIM, given_back, self.replica)
        everything = len(rows) < limit and not given_back and not capped
        short = None if given_back or more is None else frozenset(more)
        return [Due(*row[:9]) for row in kept], everything, next_at, given_back, short

    async def poll(self, now: float, limit: int, destinations: Sequence[str],
                   exclude: Collection[int] = ()) -> DueBatch:
        """``due``'s claims; ``complete`` when it claimed every row it could, with the next
        time another can be claimed (a ``not_before``, or the end of another replica's lease).
        Work that other replicas store or give back later is not in it: the service's
        follower (relay/service.py, ``_follow_other_replicas``) wakes the dispatcher for that,
        as replays and shared suspensions do."""
        rows, everything, next_at, given_back, short = await self._claim(
            sql.LOOK, now, limit, destinations, exclude, DUE_BUDGET)
        if not everything:
            # More may be due: the dispatcher looks again once it has used these. With none
            # claimed, every candidate was locked elsewhere (a destination's whole share):
            # shortly, as below.
            return DueBatch(rows, False, None if rows else now + LOCKED_RECHECK,
                            given_back=given_back, capped=short)
        if next_at is not None and next_at <= now:
            # Due, yet not claimed: another replica's claim held it locked (SKIP LOCKED) and the
            # statement's snapshot saw it as before. That claim has usually committed by now: a
            # fresh read gives the end of its lease instead of "look again at once".
            try:
                next_at = await self.next_due_at(destinations,
                                                 [*exclude, *(due.seq for due in rows)])
            except SpoolError:
                return DueBatch(rows, False, None)  # claimed rows are never dropped
            if next_at is not None and next_at <= now:
                # Still there, due when the look ran: a longer transaction holds it locked (a
                # large ADD_HELD, an operator's UPDATE). Look again shortly, not at once: the
                # dispatcher would otherwise look without pause until it commits.
                next_at = now + LOCKED_RECHECK
        return DueBatch(rows, True, next_at)

    async def next_due_at(self, destinations: Sequence[str],
                          exclude: Collection[int] = ()) -> float | None:
        """The earliest time a pending delivery of these destinations can be claimed."""
        if not destinations:
            return None
        rows = await self._fetch_lightly(sql.NEXT_DUE, list(destinations), list(exclude),
                                         self.replica, self.clock())
        value: float | None = rows[0][0]
        return value

    async def record_attempt(self, due: Due, attempt: Attempt, *, state: str,
                             not_before: float | None, failures: int,
                             reason: str | None) -> None:
        """Write one attempt and the delivery's new state; resolves once committed. Ignored
        (with a warning) if this replica's lease on the delivery was taken over."""
        await self._submit("record", (
            due.seq, due.attempts + 1, attempt.at, attempt.duration, attempt.status_code,
            _storable(attempt.error), _storable(attempt.excerpt), state,
            not_before if not_before is not None else attempt.at, failures, _storable(reason)))

    async def replay(self, *, delivery_ids: Sequence[str] = (), destination: str | None = None,
                     failed_since: float | None = None) -> list[str]:
        """Put failed deliveries back to pending, due now, with fresh retry windows.

        Selects by ids, or by destination and/or failure time; returns the ids replayed.
        """
        self._check_writable()
        rows = await self._fetch(sql.REPLAY, self.clock(), list(delivery_ids), destination,
                                 failed_since)
        return [row[0] for row in rows]

    async def add_held(self, destinations: Sequence[str], seconds: float) -> int:
        """Credit ``seconds`` of host suspension to the retry window of every delivery of these
        destinations that has started retrying."""
        if not destinations or seconds <= 0:
            return 0
        self._check_writable()
        async with self._connection() as conn:
            status = await conn.execute(sql.ADD_HELD, list(destinations), seconds)
        return int(status.split()[-1])

    async def pending_by_destination(self) -> dict[str, int]:
        """How many deliveries wait, per destination."""
        return {row[0]: row[1] for row in await self._fetch(sql.PENDING_BY_DESTINATION)}

    async def oldest_due(self, now: float) -> float | None:
        """``not_before`` of the longest-waiting due delivery, or None when nothing is due."""
        value: float | None = await self._fetchval(sql.OLDEST_DUE, now)
        return value

    # -- the activity log ------------------------------------------------------------------

    async def prune(self, retention: float) -> int:
        """Delete finished events (and their deliveries and attempts) older than ``retention``,
        at most 10,000 per call, and sender ids older than the dedupe window. One replica at a
        time (a transaction advisory lock): while another holds it, this one prunes nothing."""
        self._check_writable()
        now = self.clock()
        async with self._connection() as conn, conn.transaction():
            if not await conn.fetchval(sql.PRUNE_LOCK, f"relay.prune:{self.schema}"):
                return 0                        # another replica is pruning now
            pruned: int = await conn.fetchval(sql.PRUNE, now - retention)
            await conn.execute(sql.PRUNE_SENDER_IDS, now - self.dedupe_window)
        return pruned

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        rows = await self._fetch(sql.GET_DELIVERY, delivery_id)
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
        rows = await self._fetch(sql.LIST_DELIVERIES, after, state, destination, limit)
        return [DeliveryRecord(*row) for row in rows]

    async def attempts_of(self, seqs: Sequence[int]) -> dict[int, list[Attempt]]:
        """Attempts of these deliveries (by seq), oldest first."""
        if not seqs:
            return {}
        found: dict[int, list[Attempt]] = {}
        for seq, *fields in await self._fetch(sql.ATTEMPTS_OF, list(seqs)):
            found.setdefault(seq, []).append(Attempt(*fields))
        return found

    async def event_json(self, delivery_id: str) -> str | None:
        """The stored event (normalised JSON) behind a delivery."""
        value: str | None = await self._fetchval(sql.EVENT_JSON, delivery_id)
        return value

    async def counts(self) -> dict[str, int]:
        """Number of deliveries by state."""
        return {row[0]: row[1] for row in await self._fetch(sql.COUNTS)}

    async def stats(self) -> dict[str, int]:
        """``open_events`` (events with a delivery still pending, checked against
        spool.max_events) and ``groups`` (groups the group writers ran since open(), ingests
        and outcomes)."""
        return {"open_events": int(await self._fetchval(sql.OPEN_EVENTS)), "groups": self.groups}


# -- a group's ingests, planned and assembled (no I/O) -----------------------------------------

Created = list[tuple[str, str, str]]   # (destination, delivery id, state) of one event


class _Plan(NamedTuple):
    """Delivery ids for every event of a group, drawn once, and the sender ids to claim: each
    with the deliveries of its first occurrence in the group."""

    events: list[list[tuple[Created, str]]]   # per job, per event: (created, packed listing)
    first: dict[str, int]                      # sender id -> the job it first occurs in
    claim: tuple[list[str], list[float], list[str]]   # ids (sorted), received_at, listing
    since: float                               # the oldest job's dedupe window start
    leases: list[tuple[float, dict[str, int]] | None]   # per job: its offered deliveries'
                                                         # lease end, and how many of which
                                                         # destinations


def _rows(lane: str, args: Any) -> int:
    """What a job adds to its lane's group: an ingest its events, an outcome one."""
    return len(args[2]) if lane == "ingest" else 1


def _plan(jobs: list[_Job], lease: float) -> _Plan:
    events: list[list[tuple[Created, str]]] = []
    first: dict[str, int] = {}
    found: dict[str, tuple[float, str]] = {}
    for j, job in enumerate(jobs):
        now, _since, job_events, _offer = job.args
        prefix = delivery_id_prefix(now)
        planned = []
        for event_id, sender_id, received_at, _body, routes in job_events:
            r = random_part()
            created = [(dest, f"{prefix}{r + i:020x}", state)
                       for i, (dest, state, _) in enumerate(routes, 1)]
            listing = pack(created)
            planned.append((created, listing))
            if sender_id and event_id not in first:
                first[event_id] = j
                found[event_id] = (received_at, listing)
        events.append(planned)
    # Claimed in the order of their ids: two groups claiming the same ids lock them in the
    # same order, and cannot deadlock on each other there.
    ids = sorted(found)
    claim = (ids, [found[i][0] for i in ids], [found[i][1] for i in ids])
    return _Plan(events, first, claim, min(job.args[1] for job in jobs),
                 [None if job.args[3] is None else (job.args[0] + lease, job.args[3][1])
                  for job in jobs])


class _Assembled(NamedTuple):
    answers: list[tuple[Exception | None, Any]]
    events: tuple[list[Any], ...]       # INSERT's event columns
    deliveries: tuple[list[Any], ...]   # and its delivery columns
    total_open: int
    fixes: dict[str, str | None]        # sender ids a refused request had claimed


def _assemble(jobs: list[_Job], plan: _Plan, claimed: set[str], known: dict[str, str],
              open_events: int | None, max_events: int) -> _Assembled:
    """Each job's answer and the rows to insert, given the sender ids ``claimed`` and those
    ``known`` (repeats, with their deliveries; updated with the group's own). A job that would
    take the spool past ``max_events`` (``open_events`` of them now) is refused whole; None:
    the statement checks the room (sql.INGEST)."""
    events_cols: tuple[list[Any], ...] = ([], [], [], [], [])
    deliveries_cols: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
    fixes: dict[str, str | None] = {}
    answers: list[tuple[Exception | None, Any]] = []
    total_open = 0
    for j, (job, planned) in enumerate(zip(jobs, plan.events, strict=True)):
        now, _since, events, _offer = job.args
        until, caps = plan.leases[j] or (None, {})
        left = dict(caps)   # deliveries still to lease, per destination, in the job's order
        entries: list[str] = []
        skipped: list[str] = []
        job_events: list[tuple[Any, ...]] = []
        job_deliveries: list[tuple[Any, ...]] = []
        job_known: dict[str, str] = {}
        new_open = 0
        stored: list[tuple[str, str]] = []   # (destination, id) of its pending deliveries
        for (event_id, sender_id, received_at, body, routes), (created, listing) in \
                zip(events, planned, strict=True):
            if sender_id:
                prior = job_known.get(event_id) or known.get(event_id)
                if prior is not None:
                    entries.append(receipt_entry(event_id, unpack(prior), True))
                    continue
                job_known[event_id] = listing
            pending = sum(1 for _, state, _ in routes if state == "pending")
            new_open += pending > 0
            job_events.append((event_id, sender_id, received_at, pending, body))
            ordinal = len(job_events)
            for (dest, did, state), (_, _, reason) in zip(created, routes, strict=True):
                lease = None
                if state == "pending" and until is not None:
                    stored.append((dest, did))
                    if left.get(dest, 0) > 0:
                        left[dest] -= 1
                        lease = until
                job_deliveries.append((did, ordinal, dest, state, now, reason, lease))
            if pending < len(created):
                skipped += [dest for dest, _, state in created if state == "skipped"]
            entries.append(receipt_entry(event_id, created, False))
        if new_open and open_events is not None and \
                open_events + total_open + new_open > max_events:
            answers.append((SpoolFull(f"the spool holds spool.max_events={max_events} "
                                      "events awaiting delivery", retry_after=30), None))
            for event_id in job_known:
                if plan.first.get(event_id, -1) == j and event_id in claimed:
                    fixes.setdefault(event_id, None)
            continue
        for event_id, listing in job_known.items():
            known[event_id] = listing
            if event_id in fixes:           # first claimed by a refused request
                fixes[event_id] = listing
        total_open += new_open
        base = len(events_cols[0])  # deliveries name their event by its place in INSERT
        for row in job_events:
            for col, value in zip(events_cols, row, strict=True):
                col.append(value)
        for did, ordinal, dest, state, at, reason, lease in job_deliveries:
            for col, value in zip(deliveries_cols, (did, base + ordinal, dest, state, at,
                                                    reason, lease), strict=True):
                col.append(value)
        answers.append((None, ("[" + ",".join(entries) + "]", len(job_events),
                               len(entries) - len(job_events), skipped, new_open > 0,
                               stored)))
    return _Assembled(answers, events_cols, deliveries_cols, total_open, fixes)


def _offered(jobs: list[_Job], plan: _Plan, answers: list[tuple[Exception | None, Any]],
             leased: dict[str, str]) -> list[tuple[Exception | None, Any]]:
    """The answers (_assemble's) as Receipt fields: with, for a job whose deliveries were
    stored leased to this replica (``leased``: delivery id -> "seq event_seq"), their rows as
    ``fresh`` (the event's place in the request, event seq, delivery seq, delivery id,
    destination), the events' bodies, the job's offer mark, and the destinations of other
    pending deliveries stored now for any replica."""
    done: list[tuple[Exception | None, Any]] = []
    for job, planned, (error, answer) in zip(jobs, plan.events, answers, strict=True):
        if error is not None:
            done.append((error, answer))
            continue
        *fields, stored = answer
        offer = job.args[3]
        fresh: list[tuple[int, int, int, str, str]] = []
        if offer is not None and leased:
            for index, (created, _listing) in enumerate(planned):
                for dest, did, _state in created:
                    row = leased.get(did)
                    if row is not None:
                        seq, event_seq = row.split(" ")
                        fresh.append((index, int(event_seq), int(seq), did, dest))
        bodies = [event[3] for event in job.args[2]] if fresh else []
        # What this statement stored (``stored``: this answer's events that are not repeats)
        # and did not lease: the dispatcher looks for those destinations' deliveries too.
        unoffered = frozenset(dest for dest, did in stored if did not in leased) \
            if fresh else frozenset[str]()
        done.append((None, (*fields, fresh, bodies, offer[0] if fresh else None, unoffered)))
    return done
