"""How PostgreSQL runs the spool's hot statements as its tables grow faster than autovacuum's
ANALYZE describes them (a real server, the spool's own pooled connections).

A claim must read about as many deliveries as it claims, whatever the backlog; an ingest group
must find repeated sender ids through the primary key, not by reading sender_ids, however many
times its statement ran while the table was empty. Both regressed silently before: plans follow
statistics, and a new spool has none (docs/performance.md, session 19).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from relay.events import Event, accept
from relay.routing import Route
from relay.spool import postgres_sql as sql
from relay.spool.postgres import PostgresSpool
from tests.pg import pg_dsn, pg_server

__all__ = ["pg_dsn", "pg_server"]  # fixtures used here

ROUTES = (Route("a", "pending"), Route("b", "pending"), Route("c", "pending"))
BIG_TABLES = ("events", "deliveries", "sender_ids", "attempts")


def item(i: int) -> tuple[Any, tuple[Route, ...]]:
    ev = Event(id=f"e{i}", channel="email", status="sent", message_id=f"m{i}")
    return accept(ev, time.time()), ROUTES


@pytest.fixture
async def spool(pg_dsn: str) -> AsyncIterator[PostgresSpool]:
    s = PostgresSpool(pg_dsn, max_events=10_000_000)
    await s.open()
    yield s
    await s.close()


async def captured(monkeypatch: pytest.MonkeyPatch, statement: str, action: Any) -> tuple[Any, ...]:
    """The arguments the spool passes to ``statement`` while ``action`` runs."""
    seen: list[tuple[Any, ...]] = []
    original = asyncpg.connection.Connection.fetch

    async def fetch(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if query == statement:
            seen.append(args)
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", fetch)
    await action
    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", original)
    assert seen, "the statement did not run"
    return seen[0]


def literal(value: Any) -> str:
    """A parameter as SQL text (EXECUTE takes no bind parameters)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return "ARRAY[" + ", ".join(literal(v) for v in value) + "]"


def scans(plan: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(node type, table, rows read) of every scan of a big table in an EXPLAIN (ANALYZE,
    FORMAT JSON) plan; rows read = rows returned + rows the scan's filter removed."""
    found = []
    if plan.get("Relation Name") in BIG_TABLES:
        found.append((plan["Node Type"], plan["Relation Name"],
                      int(plan.get("Actual Rows", 0)) + int(plan.get("Rows Removed by Filter", 0))))
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


@pytest.mark.parametrize("name", ["INGEST", "CLAIM"])
async def test_ingest_keeps_probing_sender_ids_by_key_as_the_table_grows(
        spool: PostgresSpool, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """An ingest group's statement (INGEST; CLAIM when a sender id repeats), run ten times on
    one of the spool's connections while sender_ids is nearly empty (PostgreSQL caches a
    generic plan after five), still probes sender_ids by its primary key once the table holds
    50,000 rows. The cached plan of the join it was read the whole table per group."""
    statement = getattr(sql, name)
    await spool.ingest([item(0)])
    args = await captured(monkeypatch, statement, spool.ingest([item(i) for i in range(5)]))
    async with spool._connection() as conn:
        # the parameters' types as PostgreSQL infers them ("_text" names text[])
        types = [t.name for t in (await conn.prepare(statement)).get_parameters()]
        values = ", ".join(f"{literal(a)}::{t}" for a, t in zip(args, types, strict=True))
        await conn.execute(f"PREPARE again({', '.join(types)}) AS {statement}")
        try:
            for _ in range(10):   # repeats of stored sender ids: nothing more is written
                await conn.fetch(f"EXECUTE again({values})")
            await conn.execute("INSERT INTO sender_ids SELECT 'x' || g, 0, '' "
                               "FROM generate_series(1, 50000) g")
            (row,) = await conn.fetch(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE again({values})")
        finally:
            await conn.execute("DEALLOCATE again")
    read = scans(json.loads(row[0])[0]["Plan"])
    assert ("Seq Scan", "sender_ids") not in {(kind, table) for kind, table, _ in read}, read
    assert sum(n for _, table, n in read if table == "sender_ids") <= 50, read


@pytest.mark.parametrize("statistics", ["none", "quiet"])
async def test_a_claim_reads_about_what_it_claims_whatever_the_statistics_say(
        spool: PostgresSpool, monkeypatch: pytest.MonkeyPatch, statistics: str) -> None:
    """60,000 pending deliveries that the statistics do not know about: none taken yet (a new
    spool), or taken when none were pending (a receiver back after a quiet hour). A look that
    claims 200 reads a few hundred deliveries, not the backlog (it read all 60,000 three times
    over: 60-100 ms a look)."""
    for start in range(0, 20_000, 1_000):
        await spool.ingest([item(i) for i in range(start, start + 1_000)])
    if statistics == "quiet":
        async with spool._connection() as conn:
            await conn.execute("UPDATE deliveries SET state = 'delivered'")
            await conn.execute("ANALYZE deliveries")
            await conn.execute("UPDATE deliveries SET state = 'pending'")
    now = time.time() + 1
    args = await captured(monkeypatch, sql.LOOK, spool.poll(now, 200, ["a", "b", "c"]))
    async with spool._connection(light=True) as conn:   # (its claims are committed: harmless)
        (row,) = await conn.fetch("EXPLAIN (ANALYZE, FORMAT JSON) " + sql.LOOK, *args)
    read = scans(json.loads(row[0])[0]["Plan"])
    deliveries = sum(n for _, table, n in read if table == "deliveries")
    assert read and deliveries <= 2_000, read


async def test_only_pending_deliveries_hold_leases(spool: PostgresSpool) -> None:
    """The other replicas' leases are found through deliveries_leased alone, without naming
    the state (postgres_sql._next_due): that holds because only pending deliveries are ever
    leased and whatever ends a delivery clears its lease. Through every statement that sets or
    clears one: deliveries stored leased (offers) beside skipped ones, claims, outcomes of
    each kind, a replay, claims given back past their budget, and the release at close."""
    from relay.spool import Attempt

    async def leased_states() -> dict[str, int]:
        async with spool._connection() as conn:
            rows = await conn.fetch("SELECT state, count(*) FROM deliveries "
                                    "WHERE lease_owner IS NOT NULL GROUP BY state")
        return dict(rows)

    spool.offers = lambda wanted: (0, dict(wanted))   # every pending delivery stored leased
    skipped = (Route("a", "pending"), Route("s", "skipped", "no template"))
    await spool.ingest([item(i) for i in range(6)] + [
        (accept(Event(id="k", channel="sms", status="sent", message_id="k"), time.time()),
         skipped)])
    assert await leased_states() == {"pending": 19}
    batch = await spool.poll(time.time() + 1, 100, ["a", "b", "c"])
    assert len(batch.due) == 19
    for n, due in enumerate(batch.due):
        state = ("delivered", "failed", "pending")[n % 3]
        await spool.record_attempt(due, Attempt(time.time(), 0.01, 200 if state == "delivered"
                                                else 500, None, None),
                                   state=state, not_before=time.time() - 1, failures=1,
                                   reason=None if state != "failed" else "gave up")
    assert await leased_states() == {}
    failed = [r.delivery_id for r in await spool.list_deliveries(state="failed")]
    assert len(await spool.replay(delivery_ids=failed)) == 6
    kept = await spool.due(time.time() + 1, 100, ["a", "b", "c"], budget=1)   # the rest given back
    assert len(kept) == 1 and await leased_states() == {"pending": 1}
    await spool.close()    # (releases the last claim; the fixture's close is then a no-op)
    await spool.open()
    assert await leased_states() == {}
    async with spool._connection() as conn:
        states = dict(await conn.fetch("SELECT state, count(*) FROM deliveries GROUP BY state"))
    assert states == {"delivered": 7, "pending": 12, "skipped": 1}, states
