"""The spool writer: a light process to start, and no single job can kill it or fail its group."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from relay.errors import SpoolError
from relay.events import Event, accept
from relay.routing import Route
from relay.spool import Attempt, Spool, wire, writer
from relay.spool.commit import Writer
from relay.spool.sqlite_schema import connect, migrate
from relay.spool.wire import (
    IngestJob,
    Job,
    PruneJob,
    RecordJob,
    ReplayJob,
    StatsJob,
    jobs_of,
    op_name,
    split_frames,
)

HEAVY = ("asyncio", "aiohttp", "pydantic", "yaml", "liquid", "prometheus_client", "jwt")
TOO_BIG = 2**70   # no SQLite INTEGER holds it: binding it raises OverflowError


def test_writer_process_imports_nothing_heavy(tmp_path: Path) -> None:
    """The writer, started as the relay starts it, loads none of the relay's heavy modules."""
    ours, theirs = socket.socketpair()
    with ours:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-X", "importtime", writer.__file__, str(theirs.fileno()),
             str(tmp_path / "s.db"), "100", "5"],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        theirs.close()
        buffer = bytearray()
        while not (ready := split_frames(buffer)):
            data = ours.recv(1 << 16)
            assert data, "the writer closed the socket before saying ready"
            buffer += data
        assert ready == [(0, None, proc.pid)]
    _, stderr = proc.communicate(timeout=30)   # it exits once the relay's end is closed
    assert proc.returncode == 0
    imported = {line.rsplit("|", 1)[1].strip() for line in stderr.decode().splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "relay.spool.commit" in imported     # the listing is the writer's real imports
    loaded = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert loaded == []
    assert not imported & {"relay.spool.api", "relay.spool.store", "relay.spool.records"}


# -- Writer.run_group on a real SQLite file, in this process ----------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Writer]:
    conn = connect(str(tmp_path / "s.db"))
    migrate(conn)
    yield Writer(conn, max_events=100)
    conn.close()


def raw(job_id: int, job: Job) -> tuple[int, str, Any]:
    """A request as it arrives from the socket: the job as a plain tuple."""
    return (job_id, op_name(job), tuple(job))


def ingest(event_id: str, received_at: Any = 1000.0, routes: int = 1) -> IngestJob:
    return IngestJob(1000.0, 0.0, [
        (event_id, 1, received_at, "{}", [(f"d{i}", "pending", None) for i in range(routes)])])


def record(seq: int, event_seq: int, status_code: Any = 200) -> RecordJob:
    return RecordJob(now=1001.0, seq=seq, event_seq=event_seq, n=1, at=1001.0, duration=0.1,
                     status_code=status_code, error=None, excerpt=None, state="delivered",
                     not_before=1001.0, failures=0, reason=None)


@contextmanager
def vm_steps(conn: sqlite3.Connection) -> Iterator[list[int]]:
    """Counts SQLite virtual-machine steps (in ticks of 100 instructions) taken inside the
    block, in ``[0]``: a measure of work that does not depend on the machine."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        yield steps
    finally:
        conn.set_progress_handler(None, 0)


def errors(answers: list[tuple[int, Any, Any]]) -> dict[int, Any]:
    return {job_id: error for job_id, error, _ in answers}


def test_poisoned_record_fails_alone_in_its_group(db: Writer) -> None:
    """A record job SQLite cannot bind fails; the group's other records and jobs commit."""
    db.run_group([raw(1, ingest("e1", routes=3))])
    deliveries = db.conn.execute("SELECT seq, event_seq FROM deliveries ORDER BY seq").fetchall()
    jobs = [record(seq, event_seq, TOO_BIG if i == 1 else 200)
            for i, (seq, event_seq) in enumerate(deliveries)]
    answers = db.run_group([raw(10 + i, job) for i, job in enumerate(jobs)]
                           + [raw(20, ReplayJob(1001.0, [], None, TOO_BIG)), raw(21, StatsJob())])
    found = errors(answers)
    assert found[10] is None and found[12] is None and found[21] is None
    assert found[11][0] == "error" and "record job: OverflowError" in found[11][1]
    assert found[20][0] == "error" and "replay job: OverflowError" in found[20][1]
    states = db.conn.execute("SELECT seq, state FROM deliveries ORDER BY seq").fetchall()
    assert [state for _, state in states] == ["delivered", "pending", "delivered"]
    assert db.conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 2
    assert db.stats()["open_events"] == 1   # the event still has its poisoned delivery to go


def test_poisoned_ingest_fails_alone_and_numbering_stays_right(db: Writer) -> None:
    """An ingest SQLite cannot bind fails; the others in its group are stored, and later
    ingests get fresh event numbers (the failed job's numbers are given back)."""
    answers = db.run_group([raw(1, ingest("e1")), raw(2, ingest("e2", received_at=TOO_BIG)),
                            raw(3, ingest("e3"))])
    found = errors(answers)
    assert found[1] is None and found[3] is None
    assert found[2][0] == "error" and "ingest job: OverflowError" in found[2][1]
    assert errors(db.run_group([raw(4, ingest("e4"))])) == {4: None}
    rows = db.conn.execute("SELECT seq, id FROM events ORDER BY seq").fetchall()
    assert rows == [(1, "e1"), (2, "e3"), (3, "e4")]
    assert db.stats()["open_events"] == 3


def test_only_groups_of_attempt_outcomes_commit_without_fsync(db: Writer) -> None:
    """Ingests, and groups mixing them with outcomes, commit with synchronous=FULL; a group of
    outcomes only with NORMAL (a power loss could only make those deliveries be sent again)."""
    def synchronous() -> int:   # 1 NORMAL, 2 FULL
        return int(db.conn.execute("PRAGMA synchronous").fetchone()[0])

    assert errors(db.run_group([raw(1, ingest("e1", routes=3))])) == {1: None}
    assert synchronous() == 2
    deliveries = db.conn.execute("SELECT seq, event_seq FROM deliveries ORDER BY seq").fetchall()
    assert errors(db.run_group([raw(2, record(*deliveries[0]))])) == {2: None}
    assert synchronous() == 1
    assert errors(db.run_group([raw(3, record(*deliveries[1])), raw(4, ingest("e2"))])) == {
        3: None, 4: None}
    assert synchronous() == 2
    assert errors(db.run_group([raw(5, record(*deliveries[2]))])) == {5: None}
    assert errors(db.run_group([raw(6, ReplayJob(1002.0, [], None, None))])) == {6: None}
    assert synchronous() == 2   # an operator's replay is fsynced like an ingest
    states = db.conn.execute("SELECT state FROM deliveries ORDER BY seq").fetchall()
    assert states == [("delivered",)] * 3 + [("pending",)]


def test_malformed_jobs_get_errors(db: Writer) -> None:
    """An unknown op or a job with the wrong number of fields is answered with an error."""
    answers = db.run_group([(1, "explode", ()), (2, "record", (1, 2)), raw(3, ingest("e1"))])
    found = errors(answers)
    assert "unknown spool job 'explode'" in found[1][1]
    assert "malformed spool record job" in found[2][1]
    assert found[3] is None


# -- the real writer process ----------------------------------------------------------------

class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def item(i: int) -> tuple[Any, tuple[Route, ...]]:
    ev = Event(id=f"e{i}", channel="email", status="sent", message_id=f"m{i}")
    return accept(ev, 1000.0), (Route("a", "pending"),)


@pytest.fixture
async def spool(tmp_path: Path):
    s = Spool(tmp_path / "spool.db", max_events=100, clock=Clock())
    await s.open()
    yield s
    await s.close()


async def test_unbindable_replay_is_an_error_and_the_writer_lives(spool: Spool) -> None:
    """replay(failed_since=2**70) fails for its caller only: same writer pid, ingest works."""
    assert spool._proc is not None
    pid = spool._proc.pid
    with pytest.raises(SpoolError, match="replay job: OverflowError"):
        await spool.replay(failed_since=TOO_BIG)
    assert spool._proc is not None and spool._proc.pid == pid and spool.writable
    (stored,) = await spool.ingest([item(1)])
    assert not stored.duplicate
    assert spool._proc.pid == pid


async def test_poisoned_record_among_good_ones_through_the_spool(spool: Spool) -> None:
    """Outcomes sent together, one unbindable: it alone fails, the others are committed."""
    await spool.ingest([item(i) for i in range(3)])
    due = await spool.due(1000.0, 10, ["a"])
    assert spool._proc is not None
    pid = spool._proc.pid
    results = await asyncio.gather(*(
        spool.record_attempt(d, Attempt(1000.0, 0.1, TOO_BIG if i == 1 else 200, None, None),
                             state="delivered", not_before=None, failures=0, reason=None)
        for i, d in enumerate(due)), return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], SpoolError) and "record job" in str(results[1])
    states = {r.event_id: r.state for r in await spool.list_deliveries()}
    assert states == {"e0": "delivered", "e1": "pending", "e2": "delivered"}
    assert spool._proc.pid == pid



async def test_a_job_the_wire_cannot_carry_fails_alone(spool: Spool) -> None:
    """A job holding a value marshal refuses (a bug: the wire carries plain values) fails for
    its caller with a ValueError naming the job (not a SpoolError, which would pause the
    dispatcher as for an outage); the jobs sent in the same frame are committed and answered,
    and the writer lives."""
    await spool.ingest([item(i) for i in range(3)])
    due = await spool.due(1000.0, 10, ["a"])
    assert spool._proc is not None
    pid = spool._proc.pid
    results = await asyncio.gather(*(
        spool.record_attempt(d, Attempt(1000.0, 0.1, 200, None,
                                        object() if i == 1 else None),  # type: ignore[arg-type]
                             state="delivered", not_before=None, failures=0, reason=None)
        for i, d in enumerate(due)), return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert type(results[1]) is ValueError
    assert "cannot send this record job to the spool writer" in str(results[1])
    states = {r.event_id: r.state for r in await spool.list_deliveries()}
    assert states == {"e0": "delivered", "e1": "pending", "e2": "delivered"}
    assert spool._proc.pid == pid and spool.writable


async def test_one_loop_turns_burst_is_cut_into_frames_and_groups(tmp_path: Path) -> None:
    """What the event loop queues in one turn goes out in frames of FRAME_JOBS, and the writer
    still takes at most about MAX_GROUP jobs per transaction: 600 ingests queued at once are
    stored in two groups or more, each answered."""
    spool = Spool(tmp_path / "spool.db", max_events=10_000, clock=Clock())
    await spool.open()
    try:
        assert spool._transport is not None
        write, writes = spool._transport.write, []
        spool._transport.write = lambda data: (writes.append(data), write(data))  # type: ignore
        before = (await spool.stats())["groups"]
        receipts = await asyncio.gather(*(spool.ingest([item(i)]) for i in range(600)))
        assert [r[0].id for r in receipts] == [f"e{i}" for i in range(600)]
        groups = (await spool.stats())["groups"] - before - 1   # (less the stats job's own)
        assert groups >= 2
        frames = split_frames(bytearray(b"".join(writes)))
        assert max(len(jobs_of(one)) for one in frames) <= wire.FRAME_JOBS
        assert sum(len(jobs_of(one)) for one in frames) == 600 + 2   # and both stats jobs
    finally:
        await spool.close()


def test_the_writer_reads_a_burst_a_bounded_slice_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer takes what is queued on its socket as one group, but not more than about
    DRAIN_BYTES at a time (lowered here): the rest of a burst waits in the socket, and every
    job still comes, in order."""
    monkeypatch.setattr(writer, "DRAIN_BYTES", 256 << 10)
    ours, theirs = socket.socketpair()
    jobs = [(n, "stats", ("x" * (200 << 10),)) for n in range(1, 21)]
    sender = threading.Thread(target=lambda: ours.sendall(
        b"".join(wire.frame_many([job], lambda *_: None) for job in jobs)))
    sender.start()
    got, held, buffer = [], [], bytearray()
    with ours, theirs:
        while len(got) < len(jobs):
            jobs_now = writer._next_jobs(theirs, buffer)
            assert jobs_now is not None
            got += jobs_now
            held.append(len(buffer))
        sender.join()
    assert [job[0] for job in got] == list(range(1, 21))
    assert max(held) <= (256 << 10) + (1 << 20)   # the bound, plus one read's worth
    assert len(held) > 1                          # taken in slices, not at once


def test_a_frame_past_its_length_fails_that_job_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job bigger than a frame's 4-byte length can say (lowered here) is refused alone; the
    others of its frame travel."""
    monkeypatch.setattr(wire, "_MAX_FRAME", 1000)
    refused: list[tuple[int, str]] = []
    data = wire.frame_many([(1, "stats", ("x" * 10,)), (2, "ingest", ("y" * 5000,)),
                            (3, "stats", ())], lambda job, exc: refused.append((job[0], str(exc))))
    got = wire.split_jobs(bytearray(data))
    assert [job[0] for job in got] == [1, 3]
    assert refused == [(2, refused[0][1])] and "more than one frame holds" in refused[0][1]


def test_answers_marshal_refuses_become_errors_for_their_jobs_alone() -> None:
    """The writer frames a client's answers as lists; one marshal refuses becomes that
    job's error, the others travel as they are, in order."""
    data = writer._frame_answers([(1, None, "ok"), (2, None, object()), (3, None, [1, 2])])
    answers = wire.split_jobs(bytearray(data))
    assert answers[0] == (1, None, "ok") and answers[2] == (3, None, [1, 2])
    assert answers[1][0] == 2 and answers[1][1][0] == "error"
    assert "cannot send this answer" in answers[1][1][1]


async def test_outcomes_of_one_moment_share_a_commit(spool: Spool) -> None:
    """Attempt outcomes recorded one event-loop turn after another wait a moment for each
    other and reach the writer together: one transaction, not one each (the writer's cost per
    outcome is mostly its transaction's). An ingest is not kept waiting behind them."""
    await spool.ingest([item(i) for i in range(8)])
    due = await spool.due(1000.0, 10, ["a"])
    assert spool._transport is not None
    write, writes = spool._transport.write, []
    spool._transport.write = lambda data: (writes.append(data), write(data))  # type: ignore
    tasks = []
    for d in due:   # one per loop turn, as attempts finish
        tasks.append(asyncio.create_task(spool.record_attempt(
            d, Attempt(1000.0, 0.1, 200, None, None), state="delivered", not_before=None,
            failures=0, reason=None)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert len(due) == 8 and len(writes) <= 2   # 1, or 2 if this machine stalled (it was 8)
    frames = split_frames(bytearray(b"".join(writes)))   # one frame per write: a list of jobs
    assert len(frames) == len(writes) and sum(len(jobs_of(one)) for one in frames) == 8
    assert {r.state for r in await spool.list_deliveries()} == {"delivered"}
    # an outcome waiting for company leaves with the next ingest, at the end of its turn
    record = asyncio.create_task(spool.record_attempt(
        due[0], Attempt(1001.0, 0.1, 200, None, None), state="delivered", not_before=None,
        failures=0, reason=None))
    await asyncio.sleep(0)
    ingest = asyncio.create_task(spool.ingest([item(99)]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not spool._out   # (both written now, not when the outcome's wait is over)
    await asyncio.gather(record, ingest)

def test_sqlite_really_refuses_the_poison() -> None:
    """The poison used here is one SQLite cannot bind (so the tests above test something)."""
    conn = sqlite3.connect(":memory:")
    try:
        with pytest.raises(OverflowError):
            conn.execute("SELECT ?", (TOO_BIG,))
    finally:
        conn.close()


def test_prune_finds_old_events_by_seq_with_no_index_by_time(db: Writer) -> None:
    """Prune takes finished events received before the cutoff, oldest first, found by a binary
    search over seqs (schema 3 keeps no index by time): it skips events still pending at the
    front, leaves those received since, takes an event numbered out of time order (a request
    that waited) once the cutoff passes the events numbered around it, and keeps the newest."""
    assert "events_by_time" not in {row[1] for row in db.conn.execute("PRAGMA index_list(events)")}
    times = [100.0 + i for i in range(60)]
    times[40] = 95.0          # out of order: numbered after events received later
    for i, at in enumerate(times):
        db.run_group([raw(i, ingest(f"e{i}", received_at=at))])
    finished = [(seq, event_seq) for seq, event_seq in db.conn.execute(
        "SELECT seq, event_seq FROM deliveries ORDER BY seq") if event_seq not in (1, 2, 5)]
    db.run_group([raw(100 + i, record(seq, event_seq)) for i, (seq, event_seq) in
                  enumerate(finished)])

    def left() -> list[int]:
        return [seq for (seq,) in db.conn.execute("SELECT seq FROM events ORDER BY seq")]

    assert db.prune(PruneJob(130.0)) == 27     # seqs 1-30 (received before 130) but 1, 2, 5
    assert left() == [1, 2, 5, *range(31, 61)]  # 41 (received at 95) waits for its neighbours
    assert db.prune(PruneJob(130.0)) == 0
    assert db.prune(PruneJob(1000.0)) == 29     # every finished one but the newest
    assert left() == [1, 2, 5, 60]
    assert db._first_received_since(1000.0) == 61 and db._first_received_since(0.0) == 1


def test_the_bytes_in_use_leave_out_free_pages(db: Writer) -> None:
    """spool.max_bytes is checked against the pages in use: a prune (or the schema-3
    migration) frees pages that new rows fill before the file grows, so a spool that was full
    takes events again once it is pruned."""
    for i in range(300):
        db.run_group([raw(i, IngestJob(1000.0, 0.0, [(f"e{i}", 1, 100.0 + i, "x" * 2000, [])]))])
    pages, page_size = (db.conn.execute(f"PRAGMA {name}").fetchone()[0]
                        for name in ("page_count", "page_size"))
    assert db.size() == pages * page_size      # nothing free yet
    assert db.prune(PruneJob(10_000.0)) == 299  # all but the newest
    assert db.conn.execute("PRAGMA page_count").fetchone()[0] == pages   # the file did not shrink
    assert db.size() < pages * page_size // 4


def test_prune_finds_its_boundary_without_reading_the_table(db: Writer) -> None:
    """The binary search costs a few rowid seeks, not a scan of the events (bodies included):
    counted in SQLite virtual-machine steps, which do not depend on the machine."""
    for i in range(2000):
        db.run_group([raw(i, IngestJob(1000.0, 0.0, [(f"e{i}", 1, 100.0 + i, "{}", [])]))])
    with vm_steps(db.conn) as steps:
        assert db._first_received_since(1100.0) == 1001
    assert steps[0] < 40, steps   # one pass over 2,000 rows alone takes more than 100


def test_an_event_stamped_in_the_future_does_not_stop_prune(db: Writer) -> None:
    """A clock that stepped back leaves an event stamped after now. Behind an old pending event
    and a stretch already pruned, it must not make the search stop before the finished events
    that follow it: they are pruned; it stays until its time has passed."""
    for i in range(100):
        db.run_group([raw(i, ingest(f"e{i}", received_at=100.0 + i))])
    done = [(seq, event_seq) for seq, event_seq in db.conn.execute(
        "SELECT seq, event_seq FROM deliveries ORDER BY seq") if event_seq != 1]
    db.run_group([raw(200 + i, record(seq, event_seq)) for i, (seq, event_seq) in
                  enumerate(done)])
    # pruned before: the search's first probe (seq 51) lands in this stretch
    db.conn.execute("DELETE FROM events WHERE seq BETWEEN 2 AND 60")
    db.conn.execute("UPDATE events SET received_at = ? WHERE seq = 61", (time.time() + 1e6,))
    assert db.prune(PruneJob(1000.0)) == 38       # 62-99; not 1 (pending), 61 or 100 (newest)
    assert [seq for (seq,) in db.conn.execute("SELECT seq FROM events ORDER BY seq")] == \
        [1, 61, 100]


def test_prune_reads_only_the_deliveries_of_the_events_it_prunes(db: Writer) -> None:
    """The deliveries table has no index by event; prune finds the range of delivery seqs of
    the events it takes (handed out in event order) instead of reading the whole table three
    times. Counted in SQLite virtual-machine steps; the rows it leaves are checked too."""
    db = Writer(db.conn, max_events=10_000)       # room for 2,000 open events
    for i in range(2000):
        db.run_group([raw(i, ingest(f"e{i}", received_at=100.0 + i, routes=3))])
    deliveries = db.conn.execute("SELECT seq, event_seq FROM deliveries").fetchall()
    for start in range(0, len(deliveries), 500):
        db.run_group([raw(10_000 + start + i, record(seq, event_seq)) for i, (seq, event_seq)
                      in enumerate(deliveries[start:start + 500])])
    with vm_steps(db.conn) as steps:
        assert db.prune(PruneJob(150.0)) == 50       # e0-e49: seqs 1-50
    assert steps[0] < 150, steps   # reading the 6,000 deliveries once takes more than that
    left = db.conn.execute("SELECT MIN(event_seq), COUNT(*) FROM deliveries").fetchone()
    assert left == (51, 5850)
    assert db.conn.execute("SELECT MIN(delivery_seq), COUNT(DISTINCT delivery_seq) "
                           "FROM attempts").fetchone() == (151, 5850)


_GROUP_IN_A_CHILD = """
import sys, time
from relay.spool.commit import Writer
from relay.spool.sqlite_schema import connect, migrate
conn = connect(sys.argv[1])
migrate(conn)
writer = Writer(conn, max_events=100_000)
body = '{"attributes": {"text": "%s"}}' % ("x" * 700)
routes = [(f"d{i}", "pending", None) for i in range(3)]
for group in range(20):   # 20 groups of 32 events, as wrk's 64 connections make them
    now = time.time()
    answers = writer.run_group([(group * 32 + j, "ingest", (now, now - 60, [
        (f"ev-{group}-{j}", 1, now, body, routes)])) for j in range(32)])
    assert all(error is None for _, error, _ in answers), answers
"""


def test_a_group_creates_no_temporary_file(tmp_path: Path) -> None:
    """A group's multi-row INSERTs keep a statement journal; SQLite's default spills one past
    64 KiB to a temporary file, created, unlinked and closed in the same transaction (seen in
    901 of 1,047 groups under wrk). The writer keeps them in memory: no file is created in
    SQLITE_TMPDIR while it runs groups the size wrk's load makes (inotify sees the creation
    even though the file is unlinked at once)."""
    libc = ctypes.CDLL(None, use_errno=True)
    watched = tmp_path / "tmp"
    watched.mkdir()
    fd = libc.inotify_init1(os.O_NONBLOCK)
    assert fd >= 0, ctypes.get_errno()
    try:
        assert libc.inotify_add_watch(fd, str(watched).encode(), 0x100) >= 0  # IN_CREATE
        subprocess.run([sys.executable, "-c", _GROUP_IN_A_CHILD, str(tmp_path / "s.db")],
                       env={**os.environ, "SQLITE_TMPDIR": str(watched)}, check=True,
                       timeout=120)
        try:
            seen = os.read(fd, 65536)
        except BlockingIOError:
            seen = b""
    finally:
        os.close(fd)
    assert seen == b"", f"the writer created temporary files: {seen!r}"


_REPLAY_AND_PRUNE_IN_A_CHILD = r"""
import resource, sys, time
from relay.spool.commit import Writer
from relay.spool.sqlite_schema import connect, migrate
path, n = sys.argv[1], int(sys.argv[2])
conn = connect(path)
migrate(conn)
writer = Writer(conn, max_events=10_000_000)       # as writer.serve opens it
body = '{"attributes": {"text": "%s"}}' % ("x" * 3000)
now = time.time()
for start in range(0, n, 500):
    answers = writer.run_group([(j, "ingest", (now, now - 60, [
        (f"ev-{j}", 0, now, body, [("d0", "pending", None)])]))
        for j in range(start, min(n, start + 500))])
    assert all(error is None for _, error, _ in answers), answers[:2]
conn.execute("UPDATE deliveries SET state = 'failed', reason = 'gave up'")   # all failed
conn.execute("UPDATE events SET pending = 0")
writer.open_events = 0
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
# a small group first, whose journals stay in memory: the replay must switch back
answers = writer.run_group([(j, "ingest", (now, now - 60, [(f"small-{j}", 0, now, "{}", [])]))
                            for j in range(10)])
assert all(error is None for _, error, _ in answers) and writer.journal_in_memory


def grown(job):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    [(_, error, result)] = writer.run_group([(1, *job)])
    assert error is None, error
    return result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024


replayed, by_replay = grown(("replay", (time.time(), [], "d0", None)))
conn.execute("UPDATE deliveries SET state = 'delivered'")
conn.execute("UPDATE events SET pending = 0")
pruned, by_prune = grown(("prune", (time.time() + 1,)))
print(len(replayed), by_replay, pruned, by_prune)
"""


def test_a_replay_or_a_prune_keeps_the_writers_memory_bounded(tmp_path: Path) -> None:
    """Groups of ingests and outcomes keep their savepoint journals in memory (above); a
    replay (up to 100,000 deliveries in one savepoint) or a prune (10,000 events) journals
    every page it changes, so they keep SQLite's default, which spills the journal to a file
    past 64 KiB. (Found by review: with every group's journal in memory, replaying 10,000
    deliveries of 3 KB events grew the writer by 65 MiB and pruning them by 46 MiB; about 4
    and 7 with the default.)"""
    out = subprocess.run([sys.executable, "-c", _REPLAY_AND_PRUNE_IN_A_CHILD,
                          str(tmp_path / "s.db"), "10000"], check=True, capture_output=True,
                         text=True, timeout=300)
    replayed, by_replay, pruned, by_prune = map(int, out.stdout.split())
    assert (replayed, pruned) == (10_000, 10_000)   # (a prune takes 10,000 at most)
    assert by_replay < 32, f"replaying 10,000 deliveries grew the writer by {by_replay} MiB"
    assert by_prune < 32, f"pruning 10,000 events grew the writer by {by_prune} MiB"


_OUTCOMES_OF_LARGE_EVENTS_IN_A_CHILD = r"""
import sys, time
from relay.spool.commit import Writer
from relay.spool.sqlite_schema import connect, migrate
from relay.spool.wire import RecordJob
path, n = sys.argv[1], int(sys.argv[2])
conn = connect(path)
migrate(conn)
writer = Writer(conn, max_events=10_000_000)
now = time.time()
char = "x" if sys.argv[4] == "ascii" else "\U0001F600"   # 1 or 4 bytes in UTF-8
body = '{"attributes": {"text": "%s"}}' % (char * (1_000_000 // len(char.encode())))
routes = [("d0", "pending", None), ("d1", "pending", None)]
for start in range(0, n, 16):
    answers = writer.run_group([(j, "ingest", (now, now - 60, [(f"ev-{j}", 0, now, body, routes)]))
                                for j in range(start, min(n, start + 16))])
    assert all(error is None for _, error, _ in answers), answers[:1]
rows = conn.execute("SELECT seq, event_seq FROM deliveries WHERE destination = 'd0'").fetchall()
if sys.argv[3] == "restart":   # the writer started again: it finds the large open events
    writer = Writer(conn, max_events=10_000_000)
group = [(j, "record", tuple(RecordJob(now, seq, event_seq, 1, now, 0.1, 200, None, "ok",
                                       "delivered", now, 0, None)))
         for j, (seq, event_seq) in enumerate(rows)]
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
del body


def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024


open("/proc/self/clear_refs", "w").write("5")    # resets VmHWM to the current RSS
before = peak_mib()
answers = writer.run_group(group)
assert all(error is None for _, error, _ in answers), answers[:1]
print(peak_mib() - before)
"""


@pytest.mark.parametrize(("restart", "text", "n"), [
    ("running", "ascii", 64), ("restart", "ascii", 64), ("running", "emoji", 14)])
def test_outcomes_of_large_events_keep_the_writers_memory_bounded(
        tmp_path: Path, restart: str, text: str, n: int) -> None:
    """Finishing one of an event's two deliveries rewrites its row (the pending count changes
    the row's size), and a savepoint journals the old copy: with the journal in memory, 64
    outcomes (delivery.concurrency's default) of 1 MB events grew the writer by 63 MiB (found
    by review). The writer's estimate takes the largest event that may be open (found again
    when it starts) at 4 bytes a character: 14 outcomes of 1 MB of emoji, 250,000 characters,
    also grew it by 17 MiB when counted in characters. Such groups keep SQLite's default
    (about 2 MiB)."""
    out = subprocess.run([sys.executable, "-c", _OUTCOMES_OF_LARGE_EVENTS_IN_A_CHILD,
                          str(tmp_path / "s.db"), str(n), restart, text], check=True,
                         capture_output=True, text=True, timeout=300)
    grown = int(out.stdout.split()[-1])
    assert grown < 8, f"{n} outcomes of 1 MB events grew the writer by {grown} MiB"


_LARGE_GROUP_IN_A_CHILD = r"""
import gc, sys, time
from relay.spool.commit import Writer
from relay.spool.sqlite_schema import connect, migrate
conn = connect(sys.argv[1])
migrate(conn)
writer = Writer(conn, max_events=10_000_000)


def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024


now = time.time()
before = rss_mib()
group = [(j, "ingest", (now, now - 60, [(f"ev-{j}", 0, now, "x" * 1_000_000,
                                          [("d0", "pending", None)])])) for j in range(256)]
assert all(error is None for _, error, _ in writer.run_group(group))
del group
for j in range(5):   # later groups of single small events
    writer.run_group([(j, "ingest", (now, now - 60, [(f"s{j}", 0, now, "{}",
                                                      [("d0", "pending", None)])]))])
gc.collect()
print(rss_mib() - before)
"""


def test_a_group_of_large_events_leaves_no_copies_of_them_behind(tmp_path: Path) -> None:
    """Python's sqlite3 keeps a cached statement's last bound values until it runs again, so
    one group of 256 events of 1 MB left ~250 MiB of bodies in the cached 256-row INSERT
    (found by review). An INSERT of events binds 256 KiB of bodies at most (one event at
    least), so what stays behind is about one event."""
    out = subprocess.run([sys.executable, "-c", _LARGE_GROUP_IN_A_CHILD, str(tmp_path / "s.db")],
                         check=True, capture_output=True, text=True, timeout=300)
    kept = int(out.stdout.split()[-1])
    assert kept < 32, f"the writer still holds {kept} MiB after the group"


def test_none_and_bytes_are_bound_as_null_and_blob_by_the_writers_adapters(db: Writer) -> None:
    """The writer registers identity adapters for None and bytes (relay.spool.sql
    bind_directly): they are still bound as NULL and BLOB, the same bytes."""
    for kind in (type(None), bytes):
        assert (kind, sqlite3.PrepareProtocol) in sqlite3.adapters
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.execute("CREATE TABLE t (a, b, c)")
        conn.execute("INSERT INTO t VALUES (?, ?, ?)", (None, b"\x00\xffab", bytearray(b"x")))
        assert conn.execute("SELECT a, typeof(a), b, typeof(b), c FROM t").fetchone() == \
            (None, "null", b"\x00\xffab", "blob", b"x")
