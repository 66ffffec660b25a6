"""Two ingest groups of one relay in flight at once on PostgreSQL (a second group runs beside a
large one: relay/spool/postgres.py, EXTRA_GROUP_EVENTS), and what a group meets after its
statement committed. Written by a review of that change (helper-35): the two about small
pools and the one about a broken connection failed at the change as first committed."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg
import pytest

import relay.spool.postgres as postgres
from relay.errors import SpoolError
from relay.events import Event, accept
from relay.routing import Route
from relay.spool.postgres import PostgresSpool
from tests.helpers import async_eventually, event
from tests.pg import pg_dsn, pg_server  # noqa: F401 (fixtures)
from tests.receiver import Receiver
from tests.test_postgres_offers import _braze, pg_stack  # noqa: F401

N = getattr(postgres, "EXTRA_GROUP_EVENTS", 128)


def ev(event_id: str | None, dests: tuple[str, ...] = ("a",)) -> Any:
    e = Event(id=event_id, channel="email", status="sent", message_id="m")
    return accept(e, time.time()), tuple(Route(d, "pending") for d in dests)


async def hold(conn: asyncpg.Connection, *ids: str) -> Any:
    """Another transaction inserts these sender ids and keeps them locked."""
    tx = conn.transaction()
    await tx.start()
    for i in ids:
        await conn.execute("INSERT INTO relay.sender_ids(id, received_at, deliveries) "
                           "VALUES ($1, 0, '')", i)
    return tx


def track_groups(spool: PostgresSpool, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Ingest groups in flight now, and the most at once so far."""
    seen = {"now": 0, "max": 0}
    real = spool._commit_part

    async def counted(kind: str, jobs: list[Any]) -> Any:
        if kind != "ingest":
            return await real(kind, jobs)
        seen["now"] += 1
        seen["max"] = max(seen["max"], seen["now"])
        try:
            return await real(kind, jobs)
        finally:
            seen["now"] -= 1

    monkeypatch.setattr(spool, "_commit_part", counted)
    return seen


async def test_one_sender_id_in_both_groups_is_stored_once(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Group A (first writer) claims x-shared, then waits on zz-held (another transaction);
    group B (second writer, 128 events) waits on x-shared. When A commits, B's x-shared is a
    duplicate naming A's deliveries."""
    spool = PostgresSpool(pg_dsn)
    await spool.open()
    seen = track_groups(spool, monkeypatch)
    other = await asyncpg.connect(pg_dsn)
    try:
        tx = await hold(other, "zz-held")
        a = asyncio.ensure_future(spool.ingest_receipt([ev("x-shared"), ev("zz-held")]))
        await asyncio.sleep(0.3)
        b = asyncio.ensure_future(spool.ingest_receipt(
            [ev(f"b{i:03}") for i in range(N - 1)] + [ev("x-shared")]))
        await asyncio.sleep(0.5)
        assert not a.done() and not b.done() and seen["max"] == 2
        await tx.rollback()
        ra, rb = await asyncio.wait_for(asyncio.gather(a, b), 10)
        assert (ra.stored, ra.duplicates) == (2, 0)
        assert (rb.stored, rb.duplicates) == (N - 1, 1)
        ea = {e.id: e for e in ra.entries()}
        eb = {e.id: e for e in rb.entries()}
        assert eb["x-shared"].duplicate and eb["x-shared"].deliveries == ea["x-shared"].deliveries
        rows = await spool.fetch_rows("SELECT count(*) FROM relay.events WHERE id = 'x-shared'")
        assert rows[0][0] == 1
        open_events = (await spool.stats())["open_events"]
        assert open_events == 2 + N - 1
    finally:
        await other.close()
        await spool.close()


async def test_close_with_a_small_job_queued_behind_a_blocked_first_writer(
        pg_dsn: str) -> None:  # noqa: F811
    """The second writer leaves at close(); the first commits what is queued once its group
    goes through; close() returns; the counts of queued events are back to 0."""
    spool = PostgresSpool(pg_dsn)
    await spool.open()
    other = await asyncpg.connect(pg_dsn)
    try:
        tx = await hold(other, "held")
        a = asyncio.ensure_future(spool.ingest_receipt([ev("held")]))
        await asyncio.sleep(0.3)
        small = asyncio.ensure_future(spool.ingest_receipt([ev("small")]))
        await asyncio.sleep(0.1)
        closing = asyncio.ensure_future(spool.close())
        await asyncio.sleep(0.3)
        assert not closing.done() and not small.done()
        await tx.rollback()
        await asyncio.wait_for(closing, 10)
        assert (await a).stored == 1 and (await small).stored == 1
        assert spool._queued == {"ingest": 0, "record": 0}
        assert all(not jobs for jobs in spool._jobs.values())
    finally:
        await other.close()
        await spool.close()


@pytest.mark.parametrize("pool_size", [5, 6])
async def test_a_small_pool_keeps_a_connection_for_reads(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, pool_size: int) -> None:  # noqa: F811
    """The ingest pool has pool_size - 2 connections. The first writer waits on a sender id
    another transaction holds and the others but one wait on a lock (add_held on a delivery
    row) when a large request comes: a read of the spool still gets the last connection, as
    with one writer. (A second writer took it, and every read failed after the wait: on a
    pool of 5 it ran at all, on a pool of 6 it started without two connections free.)"""
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT", 1.0)
    spool = PostgresSpool(pg_dsn, pool_size=pool_size)
    await spool.open()
    other = await asyncpg.connect(pg_dsn)
    try:
        r = await spool.ingest_receipt([ev("seed")])
        await other.execute("UPDATE relay.deliveries SET first_attempt_at = 1")
        tx = await hold(other, "held0", "held1")
        await other.execute("UPDATE relay.deliveries SET held = 0")   # row lock on seed's
        a = asyncio.ensure_future(spool.ingest_receipt([ev("held0")]))
        await asyncio.sleep(0.3)
        busy = [asyncio.ensure_future(spool.add_held(["a"], 5.0)) for _ in range(pool_size - 4)]
        await asyncio.sleep(0.3)
        b = asyncio.ensure_future(spool.ingest_receipt(
            [ev(f"b{i}") for i in range(N - 1)] + [ev("held1")]))
        await asyncio.sleep(0.3)
        try:
            assert (await spool.counts())["pending"] >= 1
        finally:
            await tx.rollback()
        await asyncio.wait_for(asyncio.gather(a, b, *busy), 10)
        assert r.stored == 1
    finally:
        await other.close()
        await spool.close()


@pytest.mark.parametrize("window,hot,poison", [(0.15, False, False), (86400.0, True, True)])
async def test_two_writers_every_stored_event_is_answered_once(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, window: float,  # noqa: F811
        hot: bool, poison: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Concurrent senders of 1, 64 or 100 events, with a short dedupe window too (ids
    replaced after it, so most groups take sql.INGEST and meet on ids both claim: the raced
    path), or ids one 30 ms slot's requests share, and requests whose statement fails (run
    again one by one beside the other writer): every event stored is named
    exactly once by an answer as new, and every duplicate names the deliveries stored for
    an event of its id."""
    import logging
    caplog.set_level(logging.INFO, logger="relay.spool")
    rng = random.Random(11)
    spool = PostgresSpool(pg_dsn, dedupe_window=window)
    await spool.open()
    seen = track_groups(spool, monkeypatch)
    raced = [0]
    real_written = spool._ingest_written

    async def written(conn: Any, jobs: Any, plan: Any, hopeful: Any, claimed: Any,
                      leased: Any) -> Any:
        raced[0] += any(i not in claimed for i in plan.claim[0])
        return await real_written(conn, jobs, plan, hopeful, claimed, leased)

    monkeypatch.setattr(spool, "_ingest_written", written)
    real_group = spool._ingest_group
    reruns = [0]

    async def group(conn: Any, jobs: Any) -> Any:   # a job whose statement fails: the group
        if any(e[0].startswith("poison") for job in jobs for e in job.args[2]):   # runs
            reruns[0] += len(jobs) > 1                                            # one by one
            raise SpoolError("spool statement failed: poison")
        return await real_group(conn, jobs)

    monkeypatch.setattr(spool, "_ingest_group", group)
    receipts: list[Any] = []
    errors: list[BaseException] = []
    deadline = time.monotonic() + 2.5

    async def sender() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.random() * 0.03)
            if hot:   # fresh ids, and one id shared by the requests of a 30 ms slot
                batch = [ev(f"u{rng.getrandbits(64):x}") for _ in range(rng.choice((1, 64, 100)))]
                batch.append(ev(f"hot{int(time.monotonic() / 0.03)}"))
                if poison and rng.random() < 0.1:
                    batch.append(ev(f"poison{rng.getrandbits(64):x}"))
            else:
                batch = [ev(None) if rng.random() < 0.2 else ev(f"s{rng.randrange(150):04}")
                         for _ in range(rng.choice((1, 64, 100)))]
            try:
                receipts.append(await spool.ingest_receipt(batch))
            except SpoolError as exc:
                if "poison" not in str(exc):
                    errors.append(exc)

    try:
        await asyncio.gather(*(sender() for _ in range(24)))
        assert not errors, errors[:3]
        assert seen["max"] == 2, seen   # both writers had groups in flight
        rows = await spool.fetch_rows(
            "SELECT e.id, array_agg(d.delivery_id ORDER BY d.delivery_id) "
            "FROM relay.events e JOIN relay.deliveries d ON d.event_seq = e.seq "
            "GROUP BY e.seq, e.id")
        stored = {tuple(dids): event_id for event_id, dids in rows}
        named_new: dict[tuple[str, ...], int] = {}
        for receipt in receipts:
            for entry in receipt.entries():
                dids = tuple(sorted(d for _, d, _ in entry.deliveries))
                assert stored.get(dids) == entry.id, (entry, dids in stored)
                if not entry.duplicate:
                    named_new[dids] = named_new.get(dids, 0) + 1
        assert set(named_new) == set(stored)
        assert all(n == 1 for n in named_new.values())
        assert (await spool.stats())["open_events"] == len(rows)
        noted = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
                 and "poison" not in r.getMessage()]
        assert not noted, noted[:5]   # no group aborted, failed or run again
    finally:
        await spool.close()


async def test_a_large_request_behind_a_blocked_group_waits_instead_of_failing(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """pool_size=5: the first writer's group waits on a sender id another transaction holds,
    and two other statements (add_held waiting on a row lock) hold the ingest pool's two
    other connections. A request of 128 events waits in the queue for the first writer and
    is stored once the lock goes, as with one writer: the second writer does not take it
    without a connection to spare (it took it and answered 503, "stayed busy")."""
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT", 1.0)
    spool = PostgresSpool(pg_dsn, pool_size=5)
    await spool.open()
    other = await asyncpg.connect(pg_dsn)
    try:
        await spool.ingest_receipt([ev("seed")])
        await other.execute("UPDATE relay.deliveries SET first_attempt_at = 1")
        tx = await hold(other, "held0")
        await other.execute("UPDATE relay.deliveries SET held = 0")   # row lock on seed's
        a = asyncio.ensure_future(spool.ingest_receipt([ev("held0")]))
        await asyncio.sleep(0.3)
        busy = [asyncio.ensure_future(spool.add_held(["a"], 5.0)) for _ in range(2)]
        await asyncio.sleep(0.3)
        large = asyncio.ensure_future(spool.ingest_receipt([ev(f"b{i}") for i in range(N)]))
        await asyncio.sleep(1.5)      # past the connection wait
        await tx.rollback()
        await asyncio.wait_for(asyncio.gather(a, *busy), 10)
        assert (await asyncio.wait_for(large, 10)).stored == N
    finally:
        await other.close()
        await spool.close()


async def test_a_broken_connection_in_the_raced_read_is_noticed(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The raced path's SENDER_IDS read (after the group committed) raising
    asyncpg.InternalClientError, a connection the database dropped mid-statement: the
    group's requests fail, nothing is stored twice, and the database is marked lost as
    _connection marks it (its connections are not reused), not left writable."""
    spool = PostgresSpool(pg_dsn)
    await spool.open()
    real = spool._ingest_written

    class Broken:
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        async def fetch(self, query: str, *args: Any) -> Any:
            raise asyncpg.InternalClientError("cannot switch to state 12")

    async def raced(conn: Any, jobs: Any, plan: Any, hopeful: Any, claimed: Any,
                    leased: Any) -> Any:   # as if another transaction had stored "x"
        return await real(Broken(conn), jobs, plan, hopeful, claimed - {"x"}, leased)

    monkeypatch.setattr(spool, "_ingest_written", raced)
    try:
        with pytest.raises(SpoolError) as info:
            await spool.ingest_receipt([ev("x"), ev(None)])
        assert "repeated sender id" in str(info.value)
        rows = await spool.fetch_rows("SELECT count(*) FROM relay.events")
        assert rows[0][0] == 2          # stored once, not run again
        assert not spool.writable, "the lost connection was not noticed"
    finally:
        await spool.close()


async def test_offers_of_two_groups_in_flight_are_sent_once(
        pg_stack: Any, receiver: Receiver,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay's two ingest groups in flight at once offer their leased rows to its
    dispatcher in either order: every delivery is sent once."""
    stack = await pg_stack(**_braze(receiver))
    spool, dispatcher = stack.spool, stack.dispatcher
    await async_eventually(lambda: dispatcher.offer_mark({"braze": 1}) is not None,
                           what="a first complete look")
    seen = track_groups(spool, monkeypatch)
    rng = random.Random(3)
    ids: dict[str, str] = {}
    counter = iter(range(10**9))
    deadline = time.monotonic() + 1.5

    async def sender() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.random() * 0.03)
            batch = [event(next(counter)) for _ in range(rng.choice((1, 64, 100)))]
            batch.append(event(0, id=f"hot{int(time.monotonic() / 0.03)}"))
            ids.update(await stack.post(*batch))

    await asyncio.gather(*(sender() for _ in range(12)))
    assert seen["max"] == 2, seen
    wanted = set(ids.values())
    await async_eventually(
        lambda: {r.headers["Webhook-Id"] for r in receiver.received("/braze")} >= wanted,
        what="every delivery sent", timeout=60)
    await asyncio.sleep(0.5)
    got = [r.headers["Webhook-Id"] for r in receiver.received("/braze")]
    assert len(got) == len(set(got)) == len(wanted), (len(got), len(set(got)), len(wanted))
