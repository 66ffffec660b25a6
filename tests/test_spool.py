"""The SQLite spool's own behaviour, on a real file: the writer process, the file lock, schema
migration, byte-bounded due batches. What both backends must do is tests/test_spool_contract.py."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from relay.errors import SpoolError, SpoolFull
from relay.events import Event, accept
from relay.routing import Route
from relay.spool import Attempt, Spool
from tests.helpers import Clock, async_eventually

PENDING = (Route("a", "pending"), Route("b", "pending"))


def item(i: int, sender_id: bool = True, routes: tuple[Route, ...] = PENDING, at: float = 1000.0):
    ev = Event(id=f"e{i}" if sender_id else None, channel="email", status="sent",
               message_id=f"m{i}")
    return accept(ev, at), routes


@pytest.fixture
async def spool(tmp_path: Path, clock: Clock):
    s = Spool(tmp_path / "spool.db", max_events=100, clock=clock)
    await s.open()
    yield s
    await s.close()


async def test_spool_at_max_bytes_refuses_new_events(tmp_path: Path) -> None:
    """Once the file reaches spool.max_bytes new events are refused (SpoolFull, naming the key,
    with a Retry-After) and none of the batch is stored; below the bound ingest works."""
    roomy = Spool(tmp_path / "roomy.db", max_bytes=64 * 1024 * 1024)
    await roomy.open()
    try:
        (ok,) = await roomy.ingest([item(1)])
        assert not ok.duplicate
        assert 0 < (await roomy.stats())["bytes"] < 64 * 1024 * 1024
    finally:
        await roomy.close()
    spool = Spool(tmp_path / "s.db", max_bytes=1)  # the empty schema is already larger
    await spool.open()
    try:
        with pytest.raises(SpoolFull) as info:
            await spool.ingest([item(1), item(2)])
        assert "spool.max_bytes=1" in str(info.value) and info.value.retry_after > 0
        assert await spool.list_deliveries() == []
        assert (await spool.stats())["open_events"] == 0
    finally:
        await spool.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A spool written by a newer relay is not silently misread."""
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(SpoolError, match="newer relay"):
        await Spool(path).open()


async def test_unopenable_path_is_a_spool_error(tmp_path: Path) -> None:
    """A path that cannot be a database gives a SpoolError naming it."""
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(SpoolError, match=r"dir\.db"):
        await Spool(tmp_path / "dir.db").open()


async def test_second_writer_on_one_file_is_refused(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two relays on one spool.path would both assign event numbers: the second is refused
    with the first relay's pid (the process that opened the spool, not its writer), once the
    lock wait is over, and the hint a port in use gets (a relay, or make run, still running)."""
    monkeypatch.setattr("relay.spool.store.LOCK_WAIT", 0.3)
    first = Spool(tmp_path / "s.db")
    await first.open()
    try:
        with pytest.raises(SpoolError) as refused:
            await Spool(tmp_path / "s.db").open()
        assert str(refused.value) == (
            f"the spool {tmp_path / 's.db'} is in use by another relay (pid {os.getpid()}): "
            "another relay, or make run, still running? Stop it, or give each relay its own "
            "spool.path")
        (ok,) = await first.ingest([item(1)])   # the first one is unaffected
        assert not ok.duplicate
    finally:
        await first.close()
    again = Spool(tmp_path / "s.db")            # the lock goes with its writer
    await again.open()
    await again.close()


async def test_killed_writer_fails_waiting_jobs_and_is_replaced(tmp_path: Path) -> None:
    """SIGKILL of the writer process mid-load: every ingest either succeeded (and is stored) or
    failed with SpoolError (a 503: the sender retries); a new writer takes over."""
    spool = Spool(tmp_path / "s.db", clock=Clock())
    await spool.open()
    try:
        assert spool._proc is not None and spool.writable
        old = spool._proc.pid
        calls = [asyncio.ensure_future(spool.ingest([item(i)])) for i in range(300)]
        await asyncio.sleep(0)
        spool._proc.kill()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, list | SpoolError) for r in results), results
        assert any(isinstance(r, SpoolError) for r in results)   # the kill hit waiting jobs
        assert not spool.writable                                # readyz says 503 meanwhile

        async def answers() -> bool:
            try:
                await spool.stats()
            except SpoolError as exc:
                assert "writer" in str(exc)
                return False
            # a job queued while the new writer starts can be answered just before open()
            # marks it up: wait for both
            return spool.writable

        await async_eventually(answers, what="a new spool writer to answer and be writable",
                               timeout=10, interval=0.05)
        assert spool._proc is not None and spool._proc.pid != old
        assert spool.writable
        for i, result in enumerate(results):   # the senders retry; acknowledged ones are kept
            (again,) = await spool.ingest([item(i)])
            # (a failed one may have been committed just before the kill: at-least-once)
            assert again.duplicate or isinstance(result, SpoolError), (i, result)
    finally:
        await spool.close()
    assert spool._proc is None


async def test_close_stops_the_writer_process(tmp_path: Path) -> None:
    """close() commits, then the writer process exits (it is waited for by pid)."""
    spool = Spool(tmp_path / "s.db")
    await spool.open()
    proc = spool._proc
    assert proc is not None and proc.poll() is None
    await spool.ingest([item(1)])
    await spool.close()
    assert proc.poll() == 0


async def test_writer_that_does_not_answer_is_stopped(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that says nothing within START_TIMEOUT (here: stuck waiting for the lock) is
    killed and reaped, and open() fails with a SpoolError saying so."""
    first = Spool(tmp_path / "s.db")
    await first.open()  # before the short timeout: on a loaded machine a start takes a while
    monkeypatch.setattr("relay.spool.store.LOCK_WAIT", 30.0)
    monkeypatch.setattr("relay.spool.store.START_TIMEOUT", 0.5)
    try:
        second = Spool(tmp_path / "s.db")
        with pytest.raises(SpoolError, match="did not start: no answer within"):
            await second.open()
        assert second._proc is None            # killed and waited for, not left behind
        assert (await first.stats())["groups"] >= 0
    finally:
        await first.close()


async def test_poll_says_whether_it_saw_all_due_work_and_when_more_falls_due(spool: Spool) -> None:
    """One read gives the dispatcher the due rows, whether they are all that is due (so it need
    not look again), the next not_before after now among the rest, and the highest delivery
    seq the read could see (offers at or below it are the read's to hand out)."""
    await spool.ingest([item(i, routes=(Route("a", "pending"),)) for i in range(3)])
    everything = await spool.poll(1000.0, 10, ["a"])
    assert [d.seq for d in everything.due] == [1, 2, 3]
    assert everything.complete and everything.next_at is None and everything.seen_upto == 3
    some = await spool.poll(1000.0, 2, ["a"])          # the limit cut it: look again
    assert len(some.due) == 2 and not some.complete and some.capped == {"a"}
    cut = await spool.poll(1000.0, 10, ["a"], budget=1)  # the byte budget cut it
    assert len(cut.due) == 1 and not cut.complete and cut.capped is None  # (anyone's)
    retry = everything.due[0]
    await spool.record_attempt(retry, Attempt(1000.0, 0.1, 503, None, None), state="pending",
                               not_before=1030.0, failures=1, reason=None)
    later = await spool.poll(1000.0, 10, ["a"])
    assert [d.seq for d in later.due] == [2, 3] and later.complete
    assert later.next_at == 1030.0                      # the retry, not the rows handed out
    assert (await spool.poll(1000.0, 10, ["a"], exclude=[retry.seq])).next_at is None
    assert (await spool.poll(1000.0, 10, ["b"])) == ([], True, None, 3, (), frozenset())
    await spool.ingest([item(9, routes=(Route("b", "pending"),))])
    assert (await spool.poll(999.0, 10, ["a"])).seen_upto == 4   # not due, not its: still seen


async def test_a_receipt_names_the_pending_deliveries_as_poll_would_hand_them_out(
        tmp_path: Path, clock: Clock) -> None:
    """The writer assigns delivery seqs and names the pending deliveries it created, so the
    relay can start them without reading them back: the same rows, field for field, that a
    poll returns; never a skipped one, nothing for a duplicate, and seqs that stay in step
    after a job the spool refused."""
    spool = Spool(tmp_path / "spool.db", max_events=3, clock=clock)
    await spool.open()
    try:
        await _receipts_match_poll(spool, clock)
    finally:
        await spool.close()


async def _receipts_match_poll(spool: Spool, clock: Clock) -> None:
    routes = (Route("a", "pending"), Route("b", "skipped", "channel"), Route("c", "pending"))
    first = await spool.ingest_receipt([item(1, routes=routes), item(2, routes=routes)])
    with pytest.raises(SpoolFull):   # 2 + 2 > spool.max_events: no rows, no seqs used
        await spool.ingest_receipt([item(3, routes=routes), item(5, routes=routes)])
    again = await spool.ingest_receipt([item(1, routes=routes)])  # a duplicate
    later = await spool.ingest_receipt([item(4, routes=routes)])
    assert again.dues() == [] and not again.pending
    offered = first.dues() + later.dues()
    assert [(d.destination, d.event_json.count('"id":"e')) for d in offered] == \
        [("a", 1), ("c", 1)] * 3
    polled = await spool.poll(clock(), 100, ["a", "b", "c"])
    assert polled.due == offered
    assert polled.seen_upto == max(d.seq for d in offered)


async def test_seqs_are_never_handed_out_twice_after_a_prune_and_a_writer_restart(
        tmp_path: Path) -> None:
    """Seqs are MAX(seq) + 1. Prune keeps the newest event and the event of the newest
    delivery, so a writer started again (here after SIGKILL) never reuses a seq: the
    dispatcher caches parsed events and offers deliveries by seq."""
    clock = Clock()
    spool = Spool(tmp_path / "s.db", clock=clock)
    await spool.open()
    try:
        routes = (Route("a", "pending"),)
        first = await spool.ingest_receipt([item(i, routes=routes) for i in range(3)])
        for due in first.dues():   # every delivery finished: every event may be pruned
            await spool.record_attempt(due, Attempt(clock(), 0.1, 200, None, None),
                                       state="delivered", not_before=None, failures=0,
                                       reason=None)
        await spool.ingest([item(9, routes=())])        # the newest event: no deliveries
        clock.now += 10_000
        assert await spool.prune(retention=60) == 2    # e9 and e2 (the newest delivery's) stay
        assert spool._proc is not None
        old = spool._proc.pid
        spool._proc.kill()
        await async_eventually(lambda: spool._proc is not None and spool._proc.pid != old
                               and spool.writable, what="a new spool writer", timeout=10)
        (again,) = (await spool.ingest_receipt([item(4, routes=routes)])).dues()
        assert (again.seq, again.event_seq) == (4, 5)    # none reused
    finally:
        await spool.close()
