"""The spool contract, on both backends: SQLite (a real file) and PostgreSQL (a real server
started by the suite). Every behaviour the server, dispatcher and API rely on holds on each;
the PostgreSQL-only tests cover a lost database and leases shared by replicas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay.config.load import parse_config
from relay.errors import SpoolError, SpoolFull
from relay.events import Event, accept
from relay.routing import Route
from relay.spool import Attempt, Spool
from relay.spool.backends import open_spool
from relay.spool.postgres import PostgresSpool
from tests.pg import PgServer, pg_dsn, pg_server

__all__ = ["pg_dsn", "pg_server"]  # fixtures used here

PENDING = (Route("a", "pending"), Route("b", "pending"))
AnySpool = Spool | PostgresSpool


def item(i: int, sender_id: bool = True, routes: tuple[Route, ...] = PENDING, at: float = 1000.0):
    ev = Event(id=f"e{i}" if sender_id else None, channel="email", status="sent",
               message_id=f"m{i}")
    return accept(ev, at), routes


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Make = Callable[..., AnySpool]


@pytest.fixture(params=["sqlite", "postgres"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    """A factory of unopened spools of one backend, all on the same storage."""
    if request.param == "sqlite":
        return lambda **kw: Spool(tmp_path / "spool.db", **kw)
    dsn = request.getfixturevalue("pg_dsn")
    return lambda **kw: PostgresSpool(dsn, **kw)


@pytest.fixture
async def spool(make: Make) -> AsyncIterator[AnySpool]:
    s = make(max_events=100, clock=Clock())
    await s.open()
    yield s
    await s.close()


def clock_of(spool: AnySpool) -> Clock:
    assert isinstance(spool.clock, Clock)
    return spool.clock


OK = Attempt(1000.0, 0.01, 200, None, None)


async def record(spool: AnySpool, due: Any, state: str, *, not_before: float | None = None,
                 failures: int = 0, reason: str | None = None, attempt: Attempt = OK) -> None:
    await spool.record_attempt(due, attempt, state=state, not_before=not_before,
                               failures=failures, reason=reason)


# -- ingest ---------------------------------------------------------------------------------

async def test_ingest_stores_one_delivery_per_route(spool: AnySpool) -> None:
    """Each event gets one pending delivery per route, each with its own id."""
    (result,) = await spool.ingest([item(1)])
    assert not result.duplicate and [d[0] for d in result.deliveries] == ["a", "b"]
    ids = {d[1] for d in result.deliveries}
    assert len(ids) == 2 and all(i.startswith("dlv_") for i in ids)
    stored = await spool.list_deliveries()
    assert {(r.delivery_id, r.event_id, r.state) for r in stored} == \
        {(i, "e1", "pending") for i in ids}


async def test_receipt_json_shape(spool: AnySpool) -> None:
    """The receipt is the SPEC's JSON: id, deliveries (destination, delivery_id, skipped?),
    duplicate?; counts of stored and duplicate events, skipped destinations, pending."""
    routes = (Route("a", "pending"), Route("b", "skipped", "no"))
    receipt = await spool.ingest_receipt([item(1, routes=routes), item(1, routes=routes)])
    first, again = json.loads(receipt.events_json)
    assert first["id"] == "e1" and "duplicate" not in first
    assert [set(d) for d in first["deliveries"]] == [{"destination", "delivery_id"},
                                                     {"destination", "delivery_id", "skipped"}]
    assert again == {**first, "duplicate": True}
    assert (receipt.stored, receipt.duplicates, receipt.skipped, receipt.pending) == \
        (1, 1, ["b"], True)


async def test_skipped_routes_are_stored_final(spool: AnySpool) -> None:
    """A skipped route is stored as skipped with its reason and does not count as open."""
    await spool.ingest([item(1, routes=(Route("a", "skipped", "cannot express"),))])
    (record_,) = await spool.list_deliveries(state="skipped")
    assert record_.reason == "cannot express"
    assert (await spool.stats())["open_events"] == 0


async def test_repeated_id_is_a_duplicate_with_the_first_deliveries(spool: AnySpool) -> None:
    """A sender id seen before is not stored again and answers with the original deliveries."""
    (first,) = await spool.ingest([item(1)])
    (again,) = await spool.ingest([item(1)])
    assert again.duplicate and again.deliveries == first.deliveries
    assert len(await spool.list_deliveries()) == 2


async def test_duplicate_within_one_batch(spool: AnySpool) -> None:
    """The same id twice in one batch is stored once."""
    results = await spool.ingest([item(1), item(1)])
    assert [r.duplicate for r in results] == [False, True]
    assert results[0].deliveries == results[1].deliveries


async def test_duplicate_across_concurrent_requests(spool: AnySpool) -> None:
    """The same id in requests committed in one group is stored once."""
    results = await asyncio.gather(*(spool.ingest([item(7)]) for _ in range(20)))
    assert sum(not r.duplicate for (r,) in results) == 1
    assert len({tuple(r.deliveries) for (r,) in results}) == 1
    assert len(await spool.list_deliveries()) == 2


async def test_dedupe_window_holds_then_expires(spool: AnySpool) -> None:
    """Within the dedupe window a repeat is a duplicate; after it, the same id is a new event."""
    await spool.ingest([item(1)])
    clock_of(spool).now += spool.dedupe_window - 1
    (within,) = await spool.ingest([item(1)])
    assert within.duplicate
    clock = clock_of(spool)
    clock.now += 2
    (later,) = await spool.ingest([item(1, at=clock.now)])
    assert not later.duplicate
    (again,) = await spool.ingest([item(1, at=clock.now)])
    assert again.duplicate and again.deliveries == later.deliveries


async def test_generated_ids_are_never_duplicates(spool: AnySpool) -> None:
    """Events without a sender id are always stored."""
    results = await spool.ingest([item(1, sender_id=False), item(1, sender_id=False)])
    assert not any(r.duplicate for r in results)


async def test_spool_full_refuses_whole_batch(make: Make) -> None:
    """At max_events the spool refuses a batch entirely and stores none of it."""
    spool = make(max_events=3)
    await spool.open()
    try:
        await spool.ingest([item(1), item(2)])
        with pytest.raises(SpoolFull) as info:
            await spool.ingest([item(3), item(4)])
        assert info.value.retry_after > 0
        assert len(await spool.list_deliveries()) == 4  # only the first batch
        assert (await spool.stats())["open_events"] == 2
        (ok,) = await spool.ingest([item(3)])
        assert not ok.duplicate                          # the refused id was not kept
    finally:
        await spool.close()


async def test_refused_request_in_a_group_leaves_no_sender_id(make: Make) -> None:
    """In one group, a request refused for max_events does not make a later request's event
    with the same id a duplicate of nothing."""
    spool = make(max_events=1)
    await spool.open()
    try:
        first, second = await asyncio.gather(spool.ingest([item(1), item(2)]),
                                             spool.ingest([item(2)]), return_exceptions=True)
        assert isinstance(first, SpoolFull)
        assert isinstance(second, list) and not second[0].duplicate
        assert {r.event_id for r in await spool.list_deliveries()} == {"e2"}
    finally:
        await spool.close()


async def test_concurrent_ingests_share_commits(make: Make) -> None:
    """Many concurrent ingests all commit, in fewer transactions than requests (group commit)."""
    spool = make()
    await spool.open()
    try:
        before = (await spool.stats())["groups"]
        results = await asyncio.gather(*(spool.ingest([item(i)]) for i in range(300)))
        assert len(results) == 300
        assert len(await spool.list_deliveries(limit=1000)) == 600
        assert (await spool.stats())["groups"] - before < 300
    finally:
        await spool.close()


async def test_data_survives_reopen(make: Make) -> None:
    """Closing and reopening keeps every delivery and the open-event count."""
    spool = make(clock=Clock())
    await spool.open()
    await spool.ingest([item(i) for i in range(10)])
    await spool.close()
    again = make(clock=Clock())
    await again.open()
    try:
        assert (await again.stats())["open_events"] == 10
        assert (await again.counts()) == {"pending": 20}
        (dup,) = await again.ingest([item(3)])
        assert dup.duplicate
    finally:
        await again.close()


# -- the work queue -------------------------------------------------------------------------

async def test_due_order_limit_destinations_and_exclude(spool: AnySpool) -> None:
    """due() gives pending deliveries due by now, oldest first, of the given destinations only,
    at most ``limit``, leaving out excluded seqs; next_due_at is the earliest not_before."""
    clock = clock_of(spool)
    for i in range(4):
        await spool.ingest([item(i)])
        clock.now += 1
    assert [d.destination for d in await spool.due(1001.5, 10, ["a"])] == ["a", "a"]
    everything = await spool.due(2000, 100, ["a", "b"])
    assert [d.seq for d in everything] == sorted(d.seq for d in everything)
    assert len(everything) == 8 and all(d.attempts == 0 for d in everything)
    assert json.loads(everything[0].event_json)["id"] == "e0"
    assert len(await spool.due(2000, 3, ["a", "b"])) == 3
    skip = {everything[0].seq, everything[1].seq}
    assert {d.seq for d in await spool.due(2000, 100, ["a", "b"], skip)} == \
        {d.seq for d in everything} - skip
    assert await spool.due(2000, 100, ["c"]) == []
    assert await spool.next_due_at(["a"]) == 1000.0
    assert await spool.next_due_at(["a"], [everything[0].seq]) == 1001.0
    assert await spool.next_due_at(["c"]) is None


async def test_a_look_is_shared_between_the_destinations_with_due_deliveries(
        spool: AnySpool) -> None:
    """A destination named twice is asked for once. Each destination that has due deliveries
    gives at most its share of the look (the look's size split between them, rounded up), its
    oldest; the look takes the oldest of those and says it is not complete while a destination
    gave its whole share. So one destination's old backlog never fills a look, and a look reads
    what it hands out, whatever the number of destinations with a backlog
    (tests/test_backlog_looks.py, tests/test_fairness.py)."""
    clock = clock_of(spool)
    for i in range(10):
        await spool.ingest([item(i, routes=(Route("a", "pending"),))])
        clock.now += 1
    for i in range(10, 20):
        await spool.ingest([item(i, routes=(Route("b", "pending"), Route("c", "pending")))])
        clock.now += 1
    twice = await spool.poll(2000, 10, ["a", "a"])
    assert [d.destination for d in twice.due] == ["a"] * 10 and not twice.complete
    # two destinations, 12 a look: 6 of each, though all of a's are older than b's
    two = await spool.poll(2000, 12, ["a", "b"])
    assert [d.destination for d in two.due] == ["a"] * 6 + ["b"] * 6 and not two.complete
    # three destinations, 6 a look: 2 of each (b's and c's share their events)
    three = await spool.poll(2000, 6, ["a", "b", "c"])
    assert [d.destination for d in three.due] == ["a", "a", "b", "c", "b", "c"]
    assert not three.complete
    # a share larger than every destination's due deliveries: all of them, complete
    whole = await spool.poll(2000, 100, ["a", "b", "c"])
    assert len(whole.due) == 30 and whole.complete
    seqs = [d.seq for d in whole.due]
    assert seqs == sorted(seqs)


async def test_a_look_short_of_its_limit_is_not_complete_when_a_share_was_used_up(
        spool: AnySpool) -> None:
    """a has 20 due deliveries, b and c one each; a look of 10 gives each a share of 4 (10 / 3
    rounded up): a's first 4, b's and c's, 6 in all, fewer than asked for, and not complete,
    since a has more (said complete, the dispatcher waited a minute for the rest). The look
    says which destination may have more: a; b's and c's were all read. A destination named
    three times is one destination: its whole look."""
    clock = clock_of(spool)
    for i in range(20):
        await spool.ingest([item(i, routes=(Route("a", "pending"),))])
        clock.now += 1
    await spool.ingest([item(20, routes=(Route("b", "pending"), Route("c", "pending")))])
    look = await spool.poll(2000, 10, ["a", "b", "c", "idle"])
    assert [d.destination for d in look.due] == ["a"] * 4 + ["b", "c"]
    assert not look.complete
    assert look.capped == {"a"}
    thrice = await spool.poll(2000, 10, ["a", "a", "a"])
    assert [d.destination for d in thrice.due] == ["a"] * 10


async def test_a_look_cut_by_its_limit_names_the_destinations_that_lost_rows(
        spool: AnySpool) -> None:
    """Three destinations with 3 due each and a look of 8: shares of 3, the 9 candidates cut to
    the oldest 8 by the limit. The one whose last row was cut may have more due, and so do the
    ones that gave their whole share; a destination with nothing due has nothing more."""
    clock = clock_of(spool)
    for i in range(3):
        await spool.ingest([item(i, routes=(Route("a", "pending"), Route("b", "pending"),
                                            Route("c", "pending")))])
        clock.now += 1
    look = await spool.poll(2000, 8, ["a", "b", "c", "idle"])
    assert len(look.due) == 8 and not look.complete
    assert look.capped == {"a", "b", "c"}


async def test_a_due_batch_is_bounded_by_the_size_of_its_events(spool: AnySpool) -> None:
    """Due rows come back within the byte budget (always at least one), oldest first."""
    big = [accept(Event(id=f"big{i}", channel="email", status="sent", message_id=f"m{i}",
                        attributes={"blob": "x" * 10_000}), 1000.0) for i in range(6)]
    await spool.ingest([(a, (Route("a", "pending"),)) for a in big])
    first = await spool.due(2000.0, 100, ["a"], budget=25_000)
    assert [d.event_json for d in first] == [a.body for a in big[:3]]  # 3 x 10 KB fit, not 4
    alone = await spool.due(2000.0, 100, ["a"], budget=1)
    assert len(alone) == 1 and alone[0].event_json == big[0].body


async def test_record_attempt_states(spool: AnySpool) -> None:
    """Delivered, retry (pending with a later not_before) and failed outcomes are stored with
    their attempts; an event stops counting as open when its last delivery finishes."""
    await spool.ingest([item(1)])
    a, b = await spool.due(1000, 10, ["a", "b"])
    await record(spool, a, "delivered")
    await record(spool, b, "pending", not_before=1060.0, failures=1,
                 attempt=Attempt(1000.0, 0.5, 503, None, "busy"))
    assert (await spool.stats())["open_events"] == 1
    assert await spool.due(1030, 10, ["a", "b"]) == []
    assert await spool.next_due_at(["a", "b"]) == 1060.0
    (b2,) = await spool.due(1060, 10, ["a", "b"])
    assert (b2.attempts, b2.failures, b2.first_attempt_at) == (1, 1, 1000.0)
    await record(spool, b2, "failed", failures=2, reason="gave up",
                 attempt=Attempt(1060.0, None, None, "timeout", None))
    assert await spool.counts() == {"delivered": 1, "failed": 1}
    assert (await spool.stats())["open_events"] == 0
    attempts = await spool.attempts_of([a.seq, b.seq])
    assert [x.status_code for x in attempts[a.seq]] == [200]
    assert [(x.status_code, x.error) for x in attempts[b.seq]] == [(503, None), (None, "timeout")]
    got = await spool.get_delivery(b.delivery_id)
    assert got is not None and (got.state, got.attempts, got.reason) == ("failed", 2, "gave up")
    assert await spool.event_json(b.delivery_id) == b.event_json
    assert await spool.event_json("dlv_nope") is None


async def test_replay_puts_failed_back_to_pending(spool: AnySpool) -> None:
    """Replay selects failed deliveries by id or destination, makes them due now with a fresh
    retry window, and they count as open again."""
    await spool.ingest([item(1), item(2)])
    for due in await spool.due(1000, 10, ["a", "b"]):
        await record(spool, due, "failed", failures=3, reason="x")
    assert (await spool.stats())["open_events"] == 0
    clock_of(spool).now = 1500.0
    (one,) = await spool.list_deliveries(destination="a", limit=1)
    assert await spool.replay(delivery_ids=[one.delivery_id]) == [one.delivery_id]
    assert await spool.replay(delivery_ids=[one.delivery_id]) == []   # pending now
    replayed = await spool.replay(destination="b")
    assert len(replayed) == 2
    assert (await spool.stats())["open_events"] == 2
    due = await spool.due(1500, 10, ["a", "b"])
    assert len(due) == 3 and all(d.failures == 0 and d.first_attempt_at is None for d in due)
    assert await spool.counts() == {"pending": 3, "failed": 1}


async def test_add_held_credits_retrying_deliveries(spool: AnySpool) -> None:
    """Held time is credited only to pending deliveries of those destinations that have started
    retrying."""
    await spool.ingest([item(1), item(2)])
    first = [d for d in await spool.due(1000, 10, ["a", "b"]) if d.event_json.find('"e1"') > 0]
    for due in first:
        await record(spool, due, "pending", not_before=1000.0, failures=1)
    assert await spool.add_held(["a"], 30.0) == 1
    assert await spool.add_held(["a"], 0) == 0
    held = {(d.destination, json.loads(d.event_json)["id"]): d.held
            for d in await spool.due(1000, 10, ["a", "b"])}
    assert held == {("a", "e1"): 30.0, ("b", "e1"): 0.0, ("a", "e2"): 0.0, ("b", "e2"): 0.0}


async def test_gauges(spool: AnySpool) -> None:
    """pending_by_destination, oldest_due and counts describe what waits."""
    await spool.ingest([item(1), item(2, routes=(Route("a", "pending"),))])
    assert await spool.pending_by_destination() == {"a": 2, "b": 1}
    assert await spool.oldest_due(999.0) is None
    assert await spool.oldest_due(2000.0) == 1000.0
    assert await spool.counts() == {"pending": 3}


# -- the activity log -----------------------------------------------------------------------

async def test_paging_and_filters(spool: AnySpool) -> None:
    """list_deliveries pages by cursor and filters by destination and state."""
    await spool.ingest([item(i) for i in range(5)])
    page1 = await spool.list_deliveries(destination="a", limit=3)
    page2 = await spool.list_deliveries(destination="a", limit=3, after=page1[-1].seq)
    assert [r.event_id for r in page1 + page2] == [f"e{i}" for i in range(5)]
    assert await spool.list_deliveries(state="failed") == []
    record_ = await spool.get_delivery(page1[0].delivery_id)
    assert record_ is not None and record_.destination == "a"
    assert await spool.get_delivery("dlv_nope") is None


async def test_prune_removes_only_finished_old_events(spool: AnySpool) -> None:
    """Pruning deletes events whose deliveries are all finished and older than retention."""
    await spool.ingest([item(1, routes=(Route("a", "skipped", "x"),), at=10.0)])
    await spool.ingest([item(2, at=10.0)])                       # still pending: kept
    await spool.ingest([item(3, routes=(Route("a", "skipped", "x"),), at=990.0)])  # recent
    assert await spool.prune(retention=100) == 1
    assert sorted(r.event_id for r in await spool.list_deliveries()) == ["e2", "e2", "e3"]


# -- open_spool -----------------------------------------------------------------------------

def test_open_spool_picks_the_configured_backend(tmp_path: Path) -> None:
    """spool.backend selects the class; the PostgreSQL lease defaults to delivery.timeout + 30s."""
    sqlite = parse_config(f"spool: {{path: {tmp_path / 's.db'}}}\ndestinations: []\n")
    assert isinstance(open_spool(sqlite.spool), Spool)
    pg = parse_config("spool:\n  backend: postgres\n  postgres:\n    dsn: postgresql://u:p@h/d\n"
                      "    schema: other\ndestinations: []\n")
    made = open_spool(pg.spool, delivery_timeout=10.0)
    assert isinstance(made, PostgresSpool)
    assert (made.schema, made.lease, made.dsn) == ("other", 40.0, "postgresql://u:p@h/d")


# -- PostgreSQL only ------------------------------------------------------------------------

async def test_newer_schema_is_refused(pg_dsn: str) -> None:
    """A schema written by a newer relay is not silently misread."""
    first = PostgresSpool(pg_dsn)
    await first.open()
    await first.close()
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("UPDATE relay.schema_version SET version = 99")
    await conn.close()
    with pytest.raises(SpoolError, match="newer relay"):
        await PostgresSpool(pg_dsn).open()


async def test_schema_is_configurable_and_created(pg_dsn: str) -> None:
    """Two schemas in one database are two separate spools."""
    one, two = PostgresSpool(pg_dsn, schema="one"), PostgresSpool(pg_dsn, schema="Two-2")
    await one.open()
    await two.open()
    try:
        await one.ingest([item(1)])
        assert await one.counts() == {"pending": 2} and await two.counts() == {}
    finally:
        await one.close()
        await two.close()


async def test_unreachable_database_is_a_spool_error() -> None:
    """open() on a DSN nothing answers gives a SpoolError naming the setting."""
    with pytest.raises(SpoolError, match=r"spool\.postgres\.dsn"):
        await PostgresSpool("postgresql://u@/d?host=/nonexistent").open()


async def test_database_restart_under_load_loses_nothing(pg_server: PgServer, pg_dsn: str) -> None:
    """PostgreSQL stopped (as a crash) while requests arrive: ingest raises SpoolError (a 503),
    writable is False and reads fail, nothing crashes; once it is back, ingest works again and
    every acknowledged event is there."""
    spool = PostgresSpool(pg_dsn, clock=Clock())
    await spool.open()
    acked: list[int] = []
    refused: list[int] = []
    stop, progress = asyncio.Event(), asyncio.Event()

    async def sender(start: int) -> None:
        i = start
        while not stop.is_set():
            try:
                await spool.ingest([item(i)])
                acked.append(i)
            except SpoolError:
                refused.append(i)
                await asyncio.sleep(0.01)
            progress.set()
            i += 10

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            progress.clear()
            await progress.wait()
    try:
        senders = [asyncio.create_task(sender(k)) for k in range(10)]
        await until(lambda: len(acked) >= 200)
        await asyncio.to_thread(pg_server.stop)
        await until(lambda: bool(refused))
        assert not spool.writable
        with pytest.raises(SpoolError):
            await spool.counts()
        await asyncio.to_thread(pg_server.start)
        for _ in range(400):          # the probe reconnects
            if spool.writable:
                break
            await asyncio.sleep(0.05)
        assert spool.writable
        settled = len(acked)
        await until(lambda: len(acked) >= settled + 100)
        stop.set()
        await asyncio.gather(*senders)
        for i in acked:               # every acknowledged event is stored
            (again,) = await spool.ingest([item(i)])
            assert again.duplicate, i
    finally:
        stop.set()
        await spool.close()


async def test_leases_keep_replicas_apart(pg_dsn: str) -> None:
    """Two replicas on one database: rows claimed by one are not given to the other; the other
    cannot record an outcome for them; an expired lease can be claimed by the other."""
    clock = Clock()
    one = PostgresSpool(pg_dsn, replica="one", lease=60.0, clock=clock)
    two = PostgresSpool(pg_dsn, replica="two", lease=60.0, clock=clock)
    await one.open()
    await two.open()
    try:
        await one.ingest([item(i) for i in range(3)])
        mine = await one.due(1000, 4, ["a", "b"])
        theirs = await two.due(1000, 10, ["a", "b"])
        assert len(mine) == 4 and len(theirs) == 2
        assert not {d.seq for d in mine} & {d.seq for d in theirs}
        assert len(await one.due(1000, 10, ["a", "b"])) == 4   # its own claims come back
        assert await two.next_due_at(["a", "b"], [d.seq for d in theirs]) == 1060.0
        await record(two, mine[0], "delivered")                 # not its lease: ignored
        got = await one.get_delivery(mine[0].delivery_id)
        assert got is not None and (got.state, got.attempts) == ("pending", 0)
        clock.now += 61                                          # one's leases expire
        taken = await two.due(clock.now, 10, ["a", "b"])
        assert {d.seq for d in mine} <= {d.seq for d in taken}
        await record(one, mine[1], "delivered")                 # one lost it: ignored
        await record(two, mine[1], "delivered")
        got = await one.get_delivery(mine[1].delivery_id)
        assert got is not None and (got.state, got.attempts) == ("delivered", 1)
    finally:
        await one.close()
        await two.close()


async def test_close_releases_claims(pg_dsn: str) -> None:
    """A replica that closes releases its claims: another takes them at once."""
    clock = Clock()
    one = PostgresSpool(pg_dsn, replica="one", clock=clock)
    two = PostgresSpool(pg_dsn, replica="two", clock=clock)
    await one.open()
    await two.open()
    try:
        await one.ingest([item(1)])
        assert len(await one.due(1000, 10, ["a", "b"])) == 2
        assert await two.due(1000, 10, ["a", "b"]) == []
        await one.close()
        assert len(await two.due(1000, 10, ["a", "b"])) == 2
    finally:
        await one.close()
        await two.close()


async def test_a_group_aborted_to_break_a_deadlock_is_run_again(pg_dsn: str) -> None:
    """Replicas' groups lock sender ids and the counters row; when PostgreSQL aborts one of
    them to break a deadlock, the spool runs it again instead of failing the ingest (a 503 to
    the sender). Here another transaction holds the counters row, our ingest claims its
    sender id and waits for the counters, and the other then waits for that sender id."""
    spool = PostgresSpool(pg_dsn)
    await spool.open()
    other = await asyncpg.connect(pg_dsn)
    try:
        await other.execute("SET deadlock_timeout = '5s'")   # our side detects it: ~1 s
        tx = other.transaction()
        await tx.start()
        await other.execute("UPDATE relay.counters SET open_events = open_events")
        ingest = asyncio.ensure_future(spool.ingest_receipt([item(1)]))
        await asyncio.sleep(0.3)                            # ours holds e1, waits for counters
        await other.execute("INSERT INTO relay.sender_ids(id, received_at, deliveries) "
                            "VALUES ('e1', 0, '') ON CONFLICT DO NOTHING")  # the cycle
        await tx.rollback()                                 # ours was the victim; let it through
        receipt = await asyncio.wait_for(ingest, 30)
        assert (receipt.stored, receipt.duplicates) == (1, 0)
        assert [e.id for e in await spool.ingest([item(1)])] == ["e1"]   # and it is stored
    finally:
        await other.close()
        await spool.close()


async def test_an_ingest_does_not_wait_behind_a_group_of_outcomes(pg_dsn: str) -> None:
    """Attempt outcomes and ingests are group-committed in lanes of their own: a sender's 202
    does not wait for outcomes to commit (at 1,000 events/s one writer for both was busy all
    the time, docs/performance.md). Here an outcome's statement waits on a row another
    transaction holds; an ingest still commits at once, and the outcome once the row is free."""
    spool = PostgresSpool(pg_dsn, clock=Clock())
    await spool.open()
    other = await asyncpg.connect(pg_dsn)
    try:
        await spool.ingest([item(1)])
        first = (await spool.due(1000, 10, ["a"]))[0]
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM relay.deliveries WHERE seq = $1 FOR UPDATE", first.seq)
        outcome = asyncio.ensure_future(record(spool, first, "delivered"))
        await asyncio.sleep(0.3)                       # the outcome's statement waits on the row
        assert not outcome.done()
        receipt = await asyncio.wait_for(spool.ingest_receipt([item(2)]), 5)
        assert receipt.stored == 1
        assert not outcome.done()
        await tx.rollback()
        await asyncio.wait_for(outcome, 5)
        got = await spool.get_delivery(first.delivery_id)
        assert got is not None and (got.state, got.attempts) == ("delivered", 1)
    finally:
        await other.close()
        await spool.close()
