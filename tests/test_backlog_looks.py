"""One dead receiver's backlog does not slow the other destinations' deliveries down.

The dispatcher leaves a suspended host's destinations (and those at their concurrency or rate
limit) out of its looks. A look for the others must then read about what it hands out, not
walk every due delivery of the destinations it left out: with 60,000 of them, a SQLite look
took 15 ms instead of 1.5, and PostgreSQL's look and next-due read all 60,000 rows, once per
look, for as long as the host stayed dead (docs/performance.md, session 20).

SQLite's work is counted in virtual-machine steps (its progress handler), PostgreSQL's in rows
its plan read (EXPLAIN ANALYZE): counts, not times, so a busy machine does not change them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay.events import Event, accept
from relay.routing import Route
from relay.spool import Spool
from relay.spool import postgres_sql as sql
from relay.spool.postgres import PostgresSpool
from relay.spool.postgres_schema import MIGRATIONS
from tests.pg import pg_dsn, pg_server
from tests.test_postgres_plans import captured

__all__ = ["pg_dsn", "pg_server"]  # fixtures used here

BACKLOG = 60_000     # due deliveries of the dead destination
LIVE = 300           # due deliveries of the live one
LIMIT = 200          # rows a look asks for


def item(i: int, destination: str) -> tuple[Any, tuple[Route, ...]]:
    ev = Event(id=f"{destination}{i}", channel="email", status="sent", message_id=f"m{i}")
    return accept(ev, time.time()), (Route(destination, "pending"),)


async def fill(ingest: Callable[[list[Any]], Awaitable[Any]]) -> None:
    """The dead destination's backlog first (older, so due before anything of the live one),
    then the live destination's deliveries."""
    for start in range(0, BACKLOG, 2_000):
        await ingest([item(i, "dead") for i in range(start, start + 2_000)])
    await ingest([item(i, "live") for i in range(LIVE)])


def deliveries_read(plan: dict[str, Any]) -> int:
    """Rows of deliveries that the scans of an EXPLAIN (ANALYZE, FORMAT JSON) plan read, over
    all their loops (a probe per candidate counts once per probe): rows returned + rows their
    filter removed."""
    read = 0
    if plan.get("Relation Name") == "deliveries" and "Scan" in plan["Node Type"]:
        read += (int(plan.get("Actual Rows", 0)) + int(plan.get("Rows Removed by Filter", 0))) \
            * int(plan.get("Actual Loops", 1))
    return read + sum(deliveries_read(child) for child in plan.get("Plans", []))


async def explained_read(spool: PostgresSpool, statement: str, *args: Any) -> int:
    """Rows of deliveries ``statement`` reads (deliveries_read), run under EXPLAIN ANALYZE on
    a claim connection with nothing leased; the claims it makes are given back after it."""
    release = "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL"
    async with spool._connection(light=True) as conn:
        await conn.execute(release)
        (row,) = await conn.fetch("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, *args)
        await conn.execute(release)
    return deliveries_read(json.loads(row[0])[0]["Plan"])


class Steps:
    """SQLite virtual-machine steps (in hundreds) run on the spool's reader connection."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        self.count += 1
        return 0

    async def of(self, spool: Spool, action: Awaitable[Any]) -> tuple[int, Any]:
        def install(conn: sqlite3.Connection) -> None:
            conn.set_progress_handler(self, 100)

        await spool._read(install)
        self.count = 0
        result = await action
        return self.count, result


@pytest.fixture
async def sqlite_spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool.db", max_events=10_000_000)
    await s.open()
    yield s
    await s.close()


async def test_sqlite_look_reads_about_what_it_hands_out(sqlite_spool: Spool) -> None:
    """A look and a next-due read for the live destination cost about what the same reads
    cost for the dead one (which hands out as many rows), not a walk of its 60,000."""
    spool = sqlite_spool
    await fill(spool.ingest)
    now = time.time() + 1
    steps = Steps()
    dead, dead_batch = await steps.of(spool, spool.poll(now, LIMIT, ["dead"]))
    live, live_batch = await steps.of(spool, spool.poll(now, LIMIT, ["live"]))
    assert len(dead_batch.due) == len(live_batch.due) == LIMIT
    assert {d.destination for d in live_batch.due} == {"live"}
    assert live <= 2 * dead + 20, (live, dead)

    # the live destination's earliest delivery: found by a probe, not after the dead one's
    later, next_at = await steps.of(spool, spool.next_due_at(["live"]))
    assert next_at is not None and next_at <= now
    assert later <= 20, later   # a few index probes, not 60,000 rows


async def test_postgres_look_reads_about_what_it_hands_out(pg_dsn: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL's look for the live destination reads a few hundred deliveries, and its
    next-due read a few, with the dead destination's 60,000 due before them."""
    spool = PostgresSpool(pg_dsn, max_events=10_000_000)
    await spool.open()
    try:
        await fill(spool.ingest)
        async with spool._connection() as conn:
            await conn.execute("ANALYZE")   # plans from true statistics: the walk is the plan's
        now = time.time() + 1
        args = await captured(monkeypatch, sql.LOOK, spool.poll(now, LIMIT, ["live"]))
        look = await explained_read(spool, sql.LOOK, *args)
        next_due = await explained_read(spool, sql.NEXT_DUE, ["live"], [], spool.replica,
                                        time.time())
        # about 800: the live destination's 200 candidates, a probe of each before it is
        # locked and one to update it, and the walk past them to the next one. It read all
        # 60,000 of the dead destination's twice: 120,802.
        assert 0 < look <= 5 * LIMIT, look
        assert 0 < next_due <= 5, next_due
    finally:
        await spool.close()


OLD_INDEX = "CREATE INDEX deliveries_due ON deliveries(not_before, seq) WHERE state = 'pending'"


async def test_a_sqlite_spool_of_schema_3_gets_the_index_led_by_destination(
        tmp_path: Path) -> None:
    """A file written before (schema 3, deliveries_due led by time) opens as schema 4 with the
    index led by destination; its pending deliveries are handed out as before."""
    path = tmp_path / "spool.db"
    spool = Spool(path)
    await spool.open()
    stored = [item(i, "live") for i in range(3)]
    await spool.ingest(stored)
    await spool.close()
    conn = sqlite3.connect(path)
    conn.executescript(f"DROP INDEX deliveries_due; {OLD_INDEX}; PRAGMA user_version=3;")
    conn.close()
    spool = Spool(path)
    await spool.open()
    try:
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
        assert [row[2] for row in conn.execute("PRAGMA index_info(deliveries_due)")] == \
            ["destination", "not_before", "seq"]
        conn.close()
        due = await spool.due(time.time() + 1, 10, ["live"])
        assert [d.event_json for d in due] == [a.body for a, _ in stored]
    finally:
        await spool.close()


async def test_a_postgres_spool_of_schema_2_gets_the_index_led_by_destination(
        pg_dsn: str) -> None:
    """The same on PostgreSQL: a schema at version 2 is migrated to 3 at open, once, and its
    pending deliveries are claimed as before."""
    spool = PostgresSpool(pg_dsn)
    await spool.open()
    await spool.ingest([item(i, "live") for i in range(3)])
    async with spool._connection() as conn:
        old_index = OLD_INDEX.replace("ON deliveries", "ON relay.deliveries")
        await conn.execute(f"DROP INDEX relay.deliveries_due; {old_index}; "
                           "UPDATE relay.schema_version SET version = 2")
    await spool.close()
    spool = PostgresSpool(pg_dsn)
    await spool.open()
    try:
        async with spool._connection() as conn:
            assert await conn.fetchval("SELECT version FROM relay.schema_version") == 3
            definition = await conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = 'relay' "
                "AND indexname = 'deliveries_due'")
        assert "(destination, not_before, seq) WHERE (state = 'pending'::text)" in definition
        due = await spool.due(time.time() + 1, 10, ["live"])
        assert len(due) == 3 and {d.destination for d in due} == {"live"}
    finally:
        await spool.close()


MANY = 100           # destinations, each with a backlog


def spread(i: int) -> tuple[Any, tuple[Route, ...]]:
    """An event for every one of MANY destinations."""
    ev = Event(id=f"s{i}", channel="email", status="sent", message_id=f"s{i}")
    return accept(ev, time.time()), tuple(Route(f"d{n}", "pending") for n in range(MANY))


async def test_sqlite_look_with_many_backlogged_destinations_reads_about_twice_its_batch(
        sqlite_spool: Spool) -> None:
    """With 100 destinations each holding 300 due deliveries, a look of 200 costs a few times
    a look of one destination's 200, not 100 times (each destination gave its first 200:
    20,000 rows read). Its batch is the oldest of what it read, and it says it is not
    complete; one busy destination among the 100 asked for still fills a whole batch."""
    spool = sqlite_spool
    for start in range(0, 300, 50):
        await spool.ingest([spread(i) for i in range(start, start + 50)])
    await spool.ingest([item(i, "solo") for i in range(LIVE)])
    now = time.time() + 1
    names = [f"d{n}" for n in range(MANY)]
    steps = Steps()
    one, one_batch = await steps.of(spool, spool.poll(now, LIMIT, ["d0"]))
    many, many_batch = await steps.of(spool, spool.poll(now, LIMIT, names))
    assert len(one_batch.due) == len(many_batch.due) == LIMIT
    assert not many_batch.complete
    assert many <= 3 * one, (many, one)   # 1.6x; 30x when each gave 200
    # the batch is in time order: event by event (each event's deliveries to the 100)
    events = [d.event_seq for d in many_batch.due]
    assert events == sorted(events) and len(set(events)) >= LIMIT // MANY
    mixed = await spool.poll(now, LIMIT, ["solo", *(f"idle{n}" for n in range(MANY))])
    # (the idle ones have nothing due: the solo one's share is the whole look)
    assert len(mixed.due) == LIMIT and {d.destination for d in mixed.due} == {"solo"}


async def test_postgres_look_with_many_backlogged_destinations_reads_about_twice_its_batch(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL's look over 100 destinations with 300 due deliveries each reads a few times
    what a look of one destination reads, not 100 times (20,000 rows and more)."""
    spool = PostgresSpool(pg_dsn, max_events=10_000_000)
    await spool.open()
    try:
        for start in range(0, 300, 50):
            await spool.ingest([spread(i) for i in range(start, start + 50)])
        async with spool._connection() as conn:
            await conn.execute("ANALYZE")
        now = time.time() + 1
        read = {}
        for asked in (["d0"], [f"d{n}" for n in range(MANY)]):
            args = await captured(monkeypatch, sql.LOOK, spool.poll(now, LIMIT, asked))
            read[len(asked)] = await explained_read(spool, sql.LOOK, *args)
        assert read[MANY] <= 4 * read[1], read
        batch = await spool.poll(now, LIMIT, [f"d{n}" for n in range(MANY)])
        assert len(batch.due) == LIMIT and not batch.complete
    finally:
        await spool.close()


async def test_postgres_look_passes_over_rows_another_transaction_holds(pg_dsn: str) -> None:
    """Rows locked by a longer transaction (a large update of a destination's deliveries) are
    passed over: a look for both destinations claims the other one's share of due deliveries
    instead, and says it is not complete (it claimed none of the locked destination's: those
    were its only candidates; the next look takes more of the other's). A look that finds nothing
    but locked rows says to look again shortly, not at once, so the dispatcher does not spin
    until the transaction ends; after it, they are claimed."""
    spool = PostgresSpool(pg_dsn, max_events=10_000_000)
    await spool.open()
    holder = await asyncpg.connect(pg_dsn)
    try:
        await spool.ingest([item(i, "dead") for i in range(LIMIT)])    # older
        await spool.ingest([item(i, "few") for i in range(5)])
        await spool.ingest([item(i, "live") for i in range(LIMIT)])
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("UPDATE relay.deliveries SET held = held + 1 "
                             "WHERE destination IN ('dead', 'few')")
        now = time.time() + 1
        both = await spool.poll(now, LIMIT, ["dead", "live"])
        assert len(both.due) == LIMIT // 2 and {d.destination for d in both.due} == {"live"}
        assert not both.complete
        # every candidate locked: all of a destination's share (the look is not complete),
        # or all it has (complete, the next time read again)
        for asked, complete in ((["dead"], False), (["few"], True)):
            locked = await spool.poll(now, LIMIT, asked)
            assert locked.due == [] and locked.complete == complete, locked
            assert locked.next_at is not None and now < locked.next_at < now + 1, locked
        await transaction.rollback()
        freed = await spool.poll(now, LIMIT, ["dead"])
        assert len(freed.due) == LIMIT and {d.destination for d in freed.due} == {"dead"}
    finally:
        await holder.close()
        await spool.close()


async def test_a_claim_during_the_postgres_migration_waits_for_it(pg_dsn: str) -> None:
    """A replica still running while another migrates the schema (a rolling upgrade) claims
    during the index build: its claim waits for the migration, which commits, and then goes
    through. Built under another name before the old index was dropped, the build let the
    claim take its first lock, and the drop then deadlocked with it: PostgreSQL aborted the
    migration, and every start tried again."""
    old = PostgresSpool(pg_dsn)      # the replica that keeps running
    await old.open()
    migrator = await asyncpg.connect(pg_dsn)
    try:
        await old.ingest([item(i, "live") for i in range(5)])
        old_index = OLD_INDEX.replace("ON deliveries", "ON relay.deliveries")
        await migrator.execute(f"DROP INDEX relay.deliveries_due; {old_index}; "
                               "UPDATE relay.schema_version SET version = 2")
        statements = [s for s in MIGRATIONS[2].split(";") if s.strip()]
        transaction = migrator.transaction()
        await transaction.start()
        await migrator.execute("SET LOCAL search_path TO relay")
        await migrator.execute(statements[0])          # the migration has begun
        claim = asyncio.ensure_future(old.poll(time.time() + 1, 10, ["live"]))
        await asyncio.sleep(0.3)                       # the claim is at the table by now
        for statement in statements[1:]:
            await migrator.execute(statement)
        await migrator.execute("UPDATE schema_version SET version = 3")
        await transaction.commit()
        batch = await asyncio.wait_for(claim, 10)
        assert len(batch.due) == 5
        definition = await migrator.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'relay' "
            "AND indexname = 'deliveries_due'")
        assert "(destination, not_before, seq)" in definition
    finally:
        await migrator.close()
        await old.close()
