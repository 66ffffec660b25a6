"""The PostgreSQL spool's writer lanes keep running whatever one group meets, and what a
receiver answers can always be recorded. Found by a red-team pass against replicas on a real
PostgreSQL (helper-30)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import asyncpg
import pytest

from relay.errors import SpoolError
from relay.events import Event, accept
from relay.routing import Route
from relay.spool import Attempt
from relay.spool.postgres import PostgresSpool
from tests.pg import pg_dsn, pg_server  # noqa: F401 (fixtures)
from tests.test_backlog_looks import item


async def test_a_connection_broken_mid_statement_does_not_end_the_outcome_writer(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """asyncpg's InternalClientError ("cannot switch to state 12; another operation is in
    progress", a connection the database dropped mid-statement) was neither a database error
    nor a lost connection to the spool: it ended the task that writes attempt outcomes, and
    every later outcome waited forever (all request slots held, /readyz still ready). The
    group fails as a lost database does, and the next outcome is written."""
    spool = PostgresSpool(pg_dsn)
    await spool.open()
    try:
        await spool.ingest([item(i, "a") for i in range(2)])
        due = await spool.due(time.time() + 1, 10, ["a"])
        assert len(due) == 2
        real = spool._record_group
        broken = [True]

        async def once_broken(conn: Any, rows: Any) -> None:
            if broken:
                broken.clear()
                raise asyncpg.InternalClientError(
                    "cannot switch to state 12; another operation (2) is in progress")
            await real(conn, rows)

        monkeypatch.setattr(spool, "_record_group", once_broken)
        attempt = Attempt(time.time(), 0.01, 200, None, "ok")
        with pytest.raises(Exception, match=r"unreachable|spool"):
            await spool.record_attempt(due[0], attempt, state="delivered", not_before=None,
                                       failures=0, reason=None)
        for one in due:   # the lane still runs (the probe may take a moment to reach it)
            for _ in range(50):
                try:
                    await spool.record_attempt(one, attempt, state="delivered",
                                               not_before=None, failures=0, reason=None)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
        assert await spool.due(time.time() + 1, 10, ["a"]) == []
    finally:
        await spool.close()


async def test_an_answer_holding_nul_bytes_is_recorded(pg_dsn: str) -> None:  # noqa: F811
    """PostgreSQL's text cannot hold NUL: an excerpt of a binary answer (b"bad\\x00body") made
    every later attempt of the replica wait for an outcome that could never be written. It is
    stored with U+FFFD in place of each NUL, as SQLite stores it as it came."""
    spool = PostgresSpool(pg_dsn)
    await spool.open()
    try:
        await spool.ingest([item(0, "a")])
        (due,) = await spool.due(time.time() + 1, 10, ["a"])
        await spool.record_attempt(due, Attempt(time.time(), 0.01, 500, "err\x00or", "bad\x00body"),
                                   state="failed", not_before=None, failures=1,
                                   reason="said \x00")
        record = await spool.get_delivery(due.delivery_id)
        assert record is not None and record.state == "failed"
        attempts = (await spool.attempts_of([record.seq]))[record.seq]
        assert attempts[0].excerpt == "bad\ufffdbody" and attempts[0].error == "err\ufffdor"
    finally:
        await spool.close()


async def test_a_group_that_failed_after_its_commit_is_not_stored_again(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A group of ingests is usually one statement, committed on its own; the receipts are
    made from its result after. If that Python raised (a bug), the group was run again one
    job at a time, as a failed statement is: every event without a sender id was stored a
    second time. Now its requests fail (503, as any commit whose answer was lost) and
    nothing is stored twice."""
    import relay.spool.postgres as postgres

    spool = PostgresSpool(pg_dsn)
    await spool.open()
    try:
        real, broken = postgres._offered, [True]

        def once_broken(*args: Any) -> Any:
            if broken:
                broken.clear()
                raise RuntimeError("a bug after the commit")
            return real(*args)

        monkeypatch.setattr(postgres, "_offered", once_broken)
        now = time.time()
        requests = [[(accept(Event(channel="email", status="sent", message_id=f"m{r}-{i}"), now),
                      (Route("a", "pending"),)) for i in range(2)] for r in range(3)]
        answers = await asyncio.gather(*(spool.ingest_receipt(r) for r in requests),
                                       return_exceptions=True)
        assert not broken, "the group did not reach the receipts"
        assert all(isinstance(answer, SpoolError) for answer in answers), answers
        stored = await spool.fetch_rows("SELECT body FROM relay.events")
        messages = sorted(json.loads(row[0])["message_id"] for row in stored)
        assert messages == sorted(f"m{r}-{i}" for r in range(3) for i in range(2))
        receipt = await spool.ingest_receipt([item(9, "a")])   # the lane still runs
        assert receipt.stored == 1
    finally:
        await spool.close()


async def test_a_large_group_does_not_wait_for_the_group_in_flight(pg_dsn: str) -> None:  # noqa: F811
    """Ingest groups ran one at a time, so the event loop and PostgreSQL each waited for the
    other half the time under batches. A second group now starts beside the one in flight once
    EXTRA_GROUP_EVENTS events wait; fewer wait for it, as before. Here the group in flight
    waits on a sender id another transaction holds."""
    import relay.spool.postgres as postgres

    spool = PostgresSpool(pg_dsn)
    await spool.open()
    other = await asyncpg.connect(pg_dsn)
    try:
        now = time.time()

        def events(prefix: str, n: int) -> list[Any]:
            return [(accept(Event(id=f"{prefix}{i}", channel="email", status="sent",
                                  message_id="m"), now), (Route("a", "pending"),))
                    for i in range(n)]

        tx = other.transaction()
        await tx.start()
        await other.execute("INSERT INTO relay.sender_ids(id, received_at, deliveries) "
                            "VALUES ('held0', 0, '')")
        held = asyncio.ensure_future(spool.ingest_receipt(events("held", 1)))
        await asyncio.sleep(0.3)
        small = asyncio.ensure_future(spool.ingest_receipt(events("small", 1)))
        await asyncio.sleep(0.3)
        assert not held.done() and not small.done()     # one group at a time for small ones
        large = await asyncio.wait_for(
            spool.ingest_receipt(events("large", postgres.EXTRA_GROUP_EVENTS)), 10)
        assert large.stored == postgres.EXTRA_GROUP_EVENTS
        assert (await asyncio.wait_for(small, 10)).stored == 1   # it went with the large one
        assert not held.done()
        await tx.rollback()
        assert (await asyncio.wait_for(held, 10)).stored == 1
    finally:
        await other.close()
        await spool.close()


async def test_a_group_that_found_every_connection_busy_is_not_run_again_job_by_job(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A group that waited the connection timeout for a free connection failed, and was then
    run again one job at a time (the way a statement error finds the job that causes it),
    each waiting the timeout again: k jobs held the writer for k + 1 waits. Its requests now
    get the 503 at once."""
    import relay.spool.postgres as postgres

    spool = PostgresSpool(pg_dsn)
    await spool.open()
    try:
        tries: list[int] = []

        async def busy(kind: str, jobs: list[Any]) -> Any:
            tries.append(len(jobs))
            raise postgres._PoolBusy("all 8 spool connections stayed busy for 5s")

        monkeypatch.setattr(spool, "_commit_part", busy)
        answers = await asyncio.gather(*(spool.ingest_receipt([item(i, "a")]) for i in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(a, SpoolError) and "stayed busy" in str(a) for a in answers)
        assert tries == [3]
    finally:
        await spool.close()


async def test_a_timeout_is_named_when_the_database_is_lost(caplog: Any) -> None:
    """A statement timeout marks the database lost: its log line and 503 said "unreachable
    ()", as str() of a TimeoutError is empty (helper-46); they name the error's type."""
    spool = PostgresSpool("postgresql://127.0.0.1:1/none")
    spool._up = spool.is_open = True
    with caplog.at_level(logging.ERROR, logger="relay.spool"):
        spool._lost(TimeoutError())
    assert "the spool database is unreachable (TimeoutError)" in caplog.text
    assert spool.unavailable is not None and "TimeoutError" in spool.unavailable
