"""Group commit: the writer's jobs, many in one transaction, each failing on its own.

``Writer.run_group`` runs every job of a group in one transaction (ingests and attempt outcomes
in bulk, other jobs each in a savepoint), then COMMIT, and only then are the answers sent. Any
exception from one job becomes that job's error: a bulk statement that raises is undone to its
savepoint and its jobs are run again one by one, each in its own savepoint, so only the bad job
fails. Only an error that leaves no transaction to continue (SQLite rolled it back, COMMIT
failed) fails the whole group, and then nothing of it is on disk.

Runs in the writer process: stdlib, relay.ids and the writer's own modules only. It never
reads the socket, never answers before COMMIT and never lets one job's exception escape.
"""

from __future__ import annotations

import contextlib
import operator
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from relay.ids import delivery_id_prefix
from relay.spool.delivery_ids import DeliveryIds
from relay.spool.receipt import pack, receipt_entry, unpack
from relay.spool.sql import bind_directly, marks, run_chunked, where
from relay.spool.wire import (
    AddHeldJob,
    Answer,
    IngestJob,
    Job,
    JobError,
    PageLimitJob,
    PruneJob,
    RecordJob,
    ReplayJob,
    StatsJob,
    op_name,
    parse,
)

J = TypeVar("J", IngestJob, RecordJob)

# A group's savepoint journals stay in memory while what they may hold is at most
# MEMORY_JOURNAL_BYTES: for each event or outcome, JOURNAL_ROW_BYTES of pages that existed
# before and that it changes (a table's last leaf, index leaves, their siblings when a page
# splits; measured at 10-32 KiB per row with random sender ids or 600,000 deliveries), and for
# an outcome its event's whole row too (finishing one of an event's deliveries can change the
# row's size, and SQLite then writes the row, body and all, again), taken as the largest event
# that may be open, in UTF-8 at 4 bytes a character at most.
MEMORY_JOURNAL_BYTES = 4 << 20
JOURNAL_ROW_BYTES = 32 << 10
# Bodies bound to one multi-row INSERT of events (one event at least), in characters (up to
# 4x in UTF-8): each cached statement keeps its last rows' bodies until it runs again
# (relay/spool/sql.py run_chunked).
BOUND_BODY_BYTES = 256 << 10
_event_size: Callable[[Sequence[Any]], int] = operator.itemgetter(7)  # an event row's size


class Writer:
    """The write connection, the counts only the writer changes, and one method per job kind."""

    def __init__(self, conn: sqlite3.Connection, max_events: int, max_bytes: int = 0) -> None:
        bind_directly()
        self.conn = conn
        self.max_events = max_events
        self.max_bytes = max_bytes  # 0: no bound on the file's size
        # (and the largest event that may be open, in characters: it only grows until the
        # writer restarts; see _journal_in_memory)
        self.open_events, self.largest_open = conn.execute(
            "SELECT COUNT(*), COALESCE(MAX(size), 0) FROM events WHERE pending > 0").fetchone()
        self.next_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events").fetchone()[0]
        # Delivery seqs are assigned here too, so an ingest's answer can name them: the relay
        # starts those deliveries from memory (Dispatcher.offer), with no read of the spool.
        self.next_delivery = conn.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM deliveries").fetchone()[0]
        self.groups = 0  # transactions run (group commit: fewer than jobs under load)
        self.ids = DeliveryIds.of(conn)  # delivery ids name their row: no index on them
        self.fsynced = True  # connect() sets synchronous=FULL
        conn.execute("PRAGMA temp_store=DEFAULT")   # a known state: see _journal_in_memory
        self.journal_in_memory = False

    def run_group(self, requests: list[tuple[int, str, Any]]) -> list[Answer]:
        """One transaction for every job; answers ``(job_id, error, result)`` after COMMIT."""
        conn = self.conn
        answers: list[Answer] = []
        records: list[tuple[int, RecordJob]] = []
        ingests: list[tuple[int, IngestJob]] = []
        others: list[tuple[int, Job]] = []
        for job_id, op, args in requests:
            try:
                job = parse(op, args)
            except JobError as exc:
                answers.append((job_id, exc.wire(), None))
                continue
            if isinstance(job, RecordJob):
                records.append((job_id, job))
            elif isinstance(job, IngestJob):
                ingests.append((job_id, job))
            else:
                others.append((job_id, job))
        counts = self.open_events, self.next_seq, self.next_delivery
        self.groups += 1
        try:
            self._fsync_commit(bool(ingests or others))
            self._journal_in_memory(not others and JOURNAL_ROW_BYTES * (len(records) + sum(
                len(job.events) for _, job in ingests))
                + len(records) * 4 * self.largest_open <= MEMORY_JOURNAL_BYTES)
            conn.execute("BEGIN IMMEDIATE")
            if records:
                answers += self._bulk("record job", records, self.record_group)
            if ingests:
                answers += self._bulk("ingest job", ingests, self.ingest_group)
            for job_id, job in others:
                answers.append(self._one(job_id, f"{op_name(job)} job", self._handle, job_id, job))
            conn.execute("COMMIT")
        except Exception as exc:
            # Nothing of this group is on disk: every job fails, and the counts rewind. (The
            # relay logs the failure where a job's caller sees it, as JSON like its other logs.)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.open_events, self.next_seq, self.next_delivery = counts
            error = as_job_error(exc, "group of jobs").wire()
            return [(job_id, error, None) for job_id, _, _ in requests]
        return answers

    def _fsync_commit(self, fsync: bool) -> None:
        """synchronous=FULL (COMMIT fsyncs the WAL) unless the group holds attempt outcomes only.

        An outcome needs no fsync of its own: a committed transaction survives SIGKILL of either
        process without one (its WAL frames are in the OS's page cache), and the next FULL
        commit or checkpoint flushes it with everything before it. Only power loss can undo an
        outcome, and then its delivery is simply sent again with the same Webhook-Id, which
        at-least-once already allows. Ingests and every other job keep FULL: a 202 or an
        operator's replay must survive power loss too. Measured in docs/performance.md."""
        if fsync != self.fsynced:
            self.conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self.fsynced = fsync

    def _journal_in_memory(self, wanted: bool) -> None:
        """Keep this group's savepoint journals in memory (temp_store=MEMORY) or let SQLite
        spill them to a temporary file past 64 KiB (its default), set before BEGIN.

        A group's savepoints (``bulk``, ``job``, and each multi-row statement's own) journal
        every page that existed before them and that they change. Past 64 KiB SQLite spills
        that to a file created, unlinked and closed within the transaction: 7 system calls and
        the journal's writes in 901 of 1,047 groups under wrk's single events. In memory it
        costs what the group changed: kept for groups of ingests and outcomes whose estimate
        (MEMORY_JOURNAL_BYTES above) is small. A replay (up to 100,000 deliveries in one
        savepoint), a prune (10,000 events), a group of outcomes of large events or a large
        group keeps SQLite's default, as a migration does: in memory those took tens to
        hundreds of MiB (tests/test_writer.py).
        """
        if wanted != self.journal_in_memory:
            self.conn.execute(f"PRAGMA temp_store={'MEMORY' if wanted else 'DEFAULT'}")
            self.journal_in_memory = wanted

    def _bulk(self, op: str, jobs: list[tuple[int, J]],
              run: Callable[[list[tuple[int, J]]], list[Answer]]) -> list[Answer]:
        """``run`` over every job at once; if it raises, over each job in its own savepoint."""
        if len(jobs) > 1:
            counts = self.open_events, self.next_seq, self.next_delivery
            self.conn.execute("SAVEPOINT bulk")
            try:
                answers = run(jobs)
                self.conn.execute("RELEASE bulk")
                return answers
            except Exception:  # one bad job must not fail the others: find it
                self.conn.execute("ROLLBACK TO bulk")
                self.conn.execute("RELEASE bulk")
                self.open_events, self.next_seq, self.next_delivery = counts
        return [self._one(job_id, op, lambda job: run([job])[0], (job_id, job))
                for job_id, job in jobs]

    def _one(self, job_id: int, op: str, fn: Callable[..., Answer], *args: Any) -> Answer:
        """``fn(*args)``'s answer in a savepoint; on any exception the job's error, with its
        writes and counts undone. (If SQLite already rolled the whole transaction back, ROLLBACK
        TO raises and run_group fails the group.)"""
        counts = self.open_events, self.next_seq, self.next_delivery
        self.conn.execute("SAVEPOINT job")
        try:
            answer = fn(*args)
            self.conn.execute("RELEASE job")
            return answer
        except Exception as exc:
            self.conn.execute("ROLLBACK TO job")
            self.conn.execute("RELEASE job")
            self.open_events, self.next_seq, self.next_delivery = counts
            return (job_id, as_job_error(exc, op).wire(), None)

    def _handle(self, job_id: int, job: Job) -> Answer:
        if isinstance(job, ReplayJob):
            return (job_id, None, self.replay(job))
        if isinstance(job, AddHeldJob):
            return (job_id, None, self.add_held(job))
        if isinstance(job, PruneJob):
            return (job_id, None, self.prune(job))
        if isinstance(job, PageLimitJob):
            return (job_id, None, self.page_limit(job))
        if isinstance(job, StatsJob):
            return (job_id, None, self.stats())
        raise JobError("error", f"the writer does not run {type(job).__name__} in a group")

    # -- ingest ----------------------------------------------------------------------------

    def ingest_group(self, jobs: list[tuple[int, IngestJob]]) -> list[Answer]:
        """Every ingest of a group with one dedupe query and two multi-row inserts.

        Each job (a request's events) stays all-or-nothing: one refused for spool.max_events adds
        no rows. Event seqs are assigned here, so deliveries need no ``lastrowid`` round trip.
        """
        known = self._recent_sender_ids([job for _, job in jobs])
        event_rows: list[tuple[Any, ...]] = []
        delivery_rows: list[tuple[Any, ...]] = []
        answers: list[Answer] = []
        open_events = self.open_events
        # The file's bytes in use now (free pages are filled before it grows): past
        # spool.max_bytes no new event is taken, so the relay pushes back (503) before the
        # volume fills and the pod is evicted.
        full = bool(self.max_bytes) and self.size() >= self.max_bytes
        for job_id, (now, _since, events) in jobs:
            entries: list[str] = []        # the receipt: one JSON object per event
            skipped: list[str] = []
            job_events: list[tuple[Any, ...]] = []
            job_deliveries: list[tuple[Any, ...]] = []
            # (index of the event in the job, event seq, delivery seq, delivery id, destination)
            # of each pending delivery created: the relay can start them without a read
            fresh: list[tuple[int, int, int, str, str]] = []
            job_known: dict[str, str] = {}
            new_open = 0
            prefix = delivery_id_prefix(now)
            make_ids = self.ids.make
            # (plain tuples: IngestEvent's fields, without building one per event)
            for index, (event_id, sender_id, received_at, body, routes) in enumerate(events):
                if sender_id:
                    listing = job_known.get(event_id) or known.get(event_id)
                    if listing is not None:
                        entries.append(receipt_entry(event_id, unpack(listing), True))
                        continue
                seq = self.next_seq + len(event_rows) + len(job_events)
                # this job's deliveries follow those of the jobs taken before it: if it is
                # refused, its ids (and rows) are dropped with it
                first = self.next_delivery + len(delivery_rows) + len(job_deliveries)
                seqs = range(first, first + len(routes))
                created: list[tuple[str, str, str]] = []
                pending = 0
                for dseq, did, (dest, state, reason) in zip(seqs, make_ids(prefix, seqs), routes,
                                                            strict=True):
                    created.append((dest, did, state))
                    job_deliveries.append((dseq, did, seq, dest, state, now, now, now, reason))
                    if state == "pending":
                        pending += 1
                        fresh.append((index, seq, dseq, did, dest))
                    elif state == "skipped":
                        skipped.append(dest)
                new_open += pending > 0
                listing = pack(created)
                job_events.append((seq, event_id, sender_id, received_at, pending, listing, body,
                                   len(body)))
                if sender_id:
                    job_known[event_id] = listing
                entries.append(receipt_entry(event_id, created, False))
            if job_events and full:
                answers.append((job_id, ("full", f"the spool file has reached spool.max_bytes="
                                                 f"{self.max_bytes} bytes", 30), None))
                continue
            if new_open and open_events + new_open > self.max_events:
                answers.append((job_id, ("full", f"the spool holds spool.max_events="
                                                 f"{self.max_events} events awaiting delivery", 30),
                                None))
                continue
            open_events += new_open
            known.update(job_known)
            event_rows += job_events
            delivery_rows += job_deliveries
            answers.append((job_id, None, ("[" + ",".join(entries) + "]", len(job_events),
                                           len(entries) - len(job_events), skipped, new_open > 0,
                                           fresh)))
        run_chunked(self.conn, "INSERT INTO events(seq, id, sender_id, received_at, pending, "
                               "deliveries, body, size) {values}", 8, event_rows,
                    row_bytes=_event_size, max_bytes=BOUND_BODY_BYTES)
        run_chunked(self.conn, "INSERT INTO deliveries(seq, delivery_id, event_seq, destination, "
                               "state, not_before, created_at, updated_at, reason) {values}", 9,
                    delivery_rows)
        # the counts change only once every row is in: a statement that raised left them as
        # they were
        self.open_events = open_events
        if event_rows:
            self.largest_open = max(self.largest_open, max(map(_event_size, event_rows)))
        self.next_seq += len(event_rows)
        self.next_delivery += len(delivery_rows)
        return answers

    def _recent_sender_ids(self, jobs: list[IngestJob]) -> dict[str, str]:
        """sender id -> deliveries listing, for the sender ids of these jobs still within
        spool.dedupe_window (each job carries its own window start)."""
        since = min(job.since for job in jobs)
        ids = list({event[0] for job in jobs for event in job.events if event[1]})
        known: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = self.conn.execute(
                f"SELECT id, deliveries FROM events WHERE sender_id = 1 AND id IN "
                f"({marks(len(chunk))}) AND received_at >= ? ORDER BY seq", (*chunk, since))
            known.update(rows)  # ordered by seq: the newest entry for an id wins
        return known

    # -- attempt outcomes ------------------------------------------------------------------

    def record_group(self, outcomes: list[tuple[int, RecordJob]]) -> list[Answer]:
        """Attempt outcomes in a few multi-row statements: the attempts, the deliveries' new
        state and, for finished deliveries, their events' pending counts."""
        attempts, updates = [], []
        finished: Counter[int] = Counter()
        for _, job in outcomes:
            attempts.append((job.seq, job.n, job.at, job.duration, job.status_code, job.error,
                             job.excerpt))
            updates.append((job.seq, job.n, job.failures, job.state, job.not_before, job.at,
                            job.reason, job.now))
            if job.state != "pending":
                finished[job.event_seq] += 1
        # An attempt number already recorded (the same delivery sent twice at once: a bug) is
        # kept as first written; failing the job instead would pause dispatching for good,
        # retrying an outcome the spool can never take.
        run_chunked(self.conn, "INSERT INTO attempts(delivery_seq, n, at, duration, status_code, "
                               "error, excerpt) {values} ON CONFLICT DO NOTHING", 7, attempts)
        run_chunked(self.conn, "UPDATE deliveries SET attempts = v.column2, failures = v.column3, "
                               "state = v.column4, not_before = v.column5, updated_at = v.column8, "
                               "first_attempt_at = COALESCE(first_attempt_at, v.column6), "
                               "reason = v.column7 FROM ({values}) AS v WHERE seq = v.column1",
                    8, updates)
        if finished:
            run_chunked(self.conn, "UPDATE events SET pending = pending - v.column2 "
                                   "FROM ({values}) AS v WHERE seq = v.column1",
                        2, list(finished.items()))
            seqs = sorted(finished)
            for start in range(0, len(seqs), 500):
                chunk = seqs[start:start + 500]
                self.open_events -= self.conn.execute(
                    f"SELECT COUNT(*) FROM events WHERE pending = 0 AND seq IN "
                    f"({marks(len(chunk))})", chunk).fetchone()[0]
        return [(job_id, None, None) for job_id, _ in outcomes]

    # -- the other jobs, each in its own savepoint -----------------------------------------

    def replay(self, job: ReplayJob) -> list[str]:
        """Failed deliveries back to pending, due now, with fresh retry windows."""
        wanted = set(job.delivery_ids)
        seqs = [self.ids.seq_of(delivery_id) for delivery_id in wanted]
        clause, args = where(
            ("state = ?", "failed"),
            # by the seq each id names, or through legacy_delivery_ids (the whole id is
            # checked below: a made-up id replays nothing)
            (f"(seq IN ({marks(len(seqs))}) OR seq IN (SELECT seq FROM legacy_delivery_ids "
             f"WHERE delivery_id IN ({marks(len(seqs))})))", [*seqs, *wanted]),
            ("destination = ?", job.destination), ("updated_at >= ?", job.failed_since))
        rows = self.conn.execute(f"SELECT seq, delivery_id, event_seq FROM deliveries WHERE "
                                 f"{clause} ORDER BY seq LIMIT 100000", args).fetchall()
        if wanted:
            rows = [row for row in rows if row[1] in wanted]
        for seq, _, event_seq in rows:
            self.conn.execute("UPDATE deliveries SET state = 'pending', not_before = ?, "
                              "failures = 0, first_attempt_at = NULL, held = 0, reason = NULL, "
                              "updated_at = ? WHERE seq = ?", (job.now, job.now, seq))
            before = self.conn.execute("UPDATE events SET pending = pending + 1 WHERE seq = ? "
                                       "RETURNING pending, size", (event_seq,)).fetchone()
            if before is not None and before[0] == 1:
                self.open_events += 1
                self.largest_open = max(self.largest_open, before[1])  # open again
        return [delivery_id for _, delivery_id, _ in rows]

    def add_held(self, job: AddHeldJob) -> int:
        """Credit host suspension time to the retry window of deliveries already retrying."""
        return self.conn.execute(
            f"UPDATE deliveries SET held = held + ? WHERE state = 'pending' AND "
            f"first_attempt_at IS NOT NULL AND destination IN ({marks(len(job.destinations))})",
            (job.seconds, *job.destinations)).rowcount

    def prune(self, job: PruneJob) -> int:
        """Delete finished events received before ``cutoff`` with their deliveries and attempts.

        The newest event and the event of the newest delivery stay: seqs are MAX(seq) + 1, and
        must never be handed out twice (the relay caches parsed events by seq, and offers
        deliveries by seq against what a look could see), even after a writer restart."""
        seqs = [r[0] for r in self.conn.execute(
            "SELECT seq FROM events WHERE seq < ? AND received_at < ? AND pending = 0 AND seq "
            "NOT IN ((SELECT MAX(seq) FROM events), COALESCE((SELECT event_seq FROM deliveries "
            "WHERE seq = (SELECT MAX(seq) FROM deliveries)), 0)) ORDER BY seq LIMIT 10000",
            (self._first_received_since(job.cutoff), job.cutoff))]
        if not seqs:
            return 0
        # Their deliveries: delivery seqs are handed out in event order, so those of these
        # events lie in one range of seqs, found like the events (the deliveries table has no
        # index by event: without the range, each statement read all of it)
        lo = self._search("deliveries", "event_seq", lambda event: event < seqs[0])
        hi = self._search("deliveries", "event_seq", lambda event: event <= seqs[-1]) - 1
        theirs = f"SELECT seq FROM deliveries WHERE seq BETWEEN ? AND ? AND event_seq IN " \
                 f"({marks(len(seqs))})"
        args = [lo, hi, *seqs]
        self.conn.execute(f"DELETE FROM attempts WHERE delivery_seq IN ({theirs})", args)
        if self.conn.execute("SELECT 1 FROM legacy_delivery_ids LIMIT 1").fetchone():
            self.conn.execute(f"DELETE FROM legacy_delivery_ids WHERE seq IN ({theirs})", args)
        self.conn.execute(f"DELETE FROM deliveries WHERE seq IN ({theirs})", args)
        self.conn.execute(f"DELETE FROM events WHERE seq IN ({marks(len(seqs))})", seqs)
        return len(seqs)

    def _first_received_since(self, cutoff: float) -> int:
        """The first event seq received at or after ``cutoff``: seqs grow with time, so the
        events table needs no index by time, one B-tree fewer on every ingest. Events are
        numbered in the order the writer takes them, which can differ from their received_at
        by the milliseconds a request waits, so prune also checks received_at: an event out of
        order is pruned a round later. An event stamped in the future (a clock stepped back
        since) must not hide the old ones before it: the search takes it as old."""
        now = time.time()
        return self._search("events", "received_at", lambda at: at < cutoff or at > now)

    def _search(self, table: str, column: str, before: Callable[[Any], bool]) -> int:
        """The first seq of ``table`` whose ``column`` is not ``before`` (MAX(seq) + 1 if every
        one is; 0 for an empty table), for a column that grows with seq: a binary search by
        rowid seeks, never a read of the table."""
        # (two subqueries: MIN and MAX in one SELECT would scan the whole table)
        lo, hi = self.conn.execute(
            f"SELECT (SELECT MIN(seq) FROM {table}), (SELECT MAX(seq) FROM {table})").fetchone()
        if lo is None:
            return 0
        hi += 1
        probe = f"SELECT seq, {column} FROM {table} WHERE seq >= ? ORDER BY seq LIMIT 1"
        while lo < hi:   # the answer is in [lo, hi]
            mid = (lo + hi) // 2
            seq, value = self.conn.execute(probe, (mid,)).fetchone()
            if before(value):
                lo = seq + 1
            else:
                hi = mid
        return int(lo)

    def page_limit(self, job: PageLimitJob) -> int:
        """Cap the file at ``pages`` more pages than it has (None: lift the cap); returns the
        page count. Lets tests make SQLite's "disk full" happen on demand."""
        count: int = self.conn.execute("PRAGMA page_count").fetchone()[0]
        limit = count + job.pages if job.pages is not None else 2**31
        self.conn.execute(f"PRAGMA max_page_count={limit}")
        return count

    def size(self) -> int:
        """The bytes of the database file in use: its pages less the free ones, which new rows
        fill before the file grows (a prune or the schema-3 migration leaves free pages; the
        file never shrinks by itself, and counting them would keep a full spool full)."""
        size: int = self.conn.execute(  # one statement: it runs for every group of ingests
            "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count(), "
            "pragma_freelist_count(), pragma_page_size()").fetchone()[0]
        return size

    def stats(self) -> dict[str, int]:
        return {"open_events": self.open_events, "groups": self.groups, "bytes": self.size()}


def as_job_error(exc: BaseException, what: str) -> JobError:
    """What the caller of ``what`` (e.g. "replay job") is told about ``exc``."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return JobError("full", "the disk holding the spool is full", 30)
    if isinstance(exc, sqlite3.Error):
        return JobError("error", f"spool write failed: {exc}")
    return JobError("error", f"the spool cannot run this {what}: {type(exc).__name__}: {exc}")
