"""Several replicas on one PostgreSQL, in one process: shared host health (relay/health_shared.py),
spool.max_events across replicas, pruning under an advisory lock, leases around a slow attempt.
The same behaviours with real relay processes are in tests/test_replicas.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import relay.spool.postgres as postgres_module
from relay.config import HealthConfig
from relay.errors import SpoolError, SpoolFull
from relay.health_shared import UNCONFIRMED_MAX, SharedHealth
from relay.spool import Attempt
from relay.spool import postgres_sql as sql
from relay.spool.postgres import PostgresSpool
from tests.pg import pg_dsn, pg_server
from tests.test_spool_contract import Clock, item, record

__all__ = ["pg_dsn", "pg_server"]  # fixtures used here

HOST = "http://127.0.0.1:9"
RULES = HealthConfig(consecutive_failures=4, min_failures=1000, suspend_for="10s",
                     suspend_max="100s")


@pytest.fixture
async def spools(pg_dsn: str) -> AsyncIterator[list[PostgresSpool]]:
    """Three replicas' spools on one database, sharing one settable clock."""
    clock = Clock()
    made = [PostgresSpool(pg_dsn, replica=f"r{i}", lease=60.0, clock=clock, max_events=5)
            for i in range(3)]
    for spool in made:
        await spool.open()
    yield made
    for spool in made:
        await spool.close()


@pytest.fixture
async def other(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the spool's schema: what another replica's transaction does."""
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": "relay"})
    yield conn
    await conn.close()


def boards(spools: list[PostgresSpool]) -> list[SharedHealth]:
    return [SharedHealth(RULES, store=s, probe_lease=30.0, clock=s.clock) for s in spools]


async def settle(*all_boards: SharedHealth) -> None:
    """Every queued statement answered, then every board reads the table once."""
    for board in all_boards:
        await board.close()
    for board in all_boards:
        await board.refresh()


async def row(spool: PostgresSpool) -> Any:
    (found,) = await spool.fetch_rows("SELECT * FROM hosts WHERE key = $1", HOST)
    return found


async def test_consecutive_failures_are_counted_across_replicas(spools: list[PostgresSpool]) -> None:
    """Failures on three replicas add up in one count: the fourth (threshold 4) suspends the
    host for every replica, though none saw more than two itself."""
    a, b, c = boards(spools)
    for board in (a, b, a, b):
        assert board.allow(HOST, 1000.0)
        board.record(HOST, True, 1000.0)
        await board.close()
    assert (await row(spools[0]))["state"] == "suspended"
    await settle(a, b, c)
    for board in (a, b, c):
        assert board.is_blocked(HOST, 1001.0) and not board.allow(HOST, 1001.0)
        assert board.peek(HOST, 1001.0)["state"] == "suspended"


async def test_success_resets_the_shared_count(spools: list[PostgresSpool]) -> None:
    """A success on any replica resets the shared count (once it has seen the count is not
    zero: at most one poll later), so failures elsewhere start over."""
    a, b, _ = boards(spools)
    for _ in range(3):
        a.record(HOST, True, 1000.0)
        await a.close()
    await b.refresh()
    b.record(HOST, False, 1000.0)
    await settle(a, b)
    assert (await row(spools[0]))["consecutive"] == 0
    a.record(HOST, True, 1000.0)
    await settle(a, b)
    assert (await row(spools[0]))["state"] == "healthy"
    assert b.peek(HOST, 1000.0)["consecutive_failures"] == 1


async def test_a_replica_holds_a_host_while_its_failures_could_trip_it(
        spools: list[PostgresSpool]) -> None:
    """A dead receiver answers faster than the database: a replica sends no more requests to
    a host while its failures still on their way to the table could make the shared count
    reach the threshold, or are UNCONFIRMED_MAX already, and sends again (waking its
    dispatcher) once the answers show the host was not tripped."""
    rules = RULES.model_copy(update={"consecutive_failures": 10})
    a, b = (SharedHealth(rules, store=s, probe_lease=30.0, clock=s.clock) for s in spools[:2])
    wakes: list[str] = []
    a.wake = lambda: wakes.append("a")
    for _ in range(UNCONFIRMED_MAX - 1):
        assert a.allow(HOST, 1000.0)
        a.record(HOST, True, 1000.0)
    assert a.allow(HOST, 1000.0) and not a.is_blocked(HOST, 1000.0)
    a.record(HOST, True, 1000.0)                     # UNCONFIRMED_MAX unanswered: held
    assert not a.allow(HOST, 1000.0) and a.is_blocked(HOST, 1000.0)
    assert a.state_of(HOST) == "healthy"
    await a.close()
    assert wakes and a.allow(HOST, 1000.0)           # 4 of 10: not tripped, sending again
    for _ in range(4):                               # b's failures: 8 of 10 in the table
        b.record(HOST, True, 1000.0)
        await b.close()
    assert b.allow(HOST, 1000.0)
    b.record(HOST, True, 1000.0)
    b.record(HOST, True, 1000.0)                     # 8 seen + 2 unanswered may be the 10th
    assert not b.allow(HOST, 1000.0)
    await b.close()
    assert (await row(spools[0]))["state"] == "suspended"
    assert b.is_blocked(HOST, 1000.0) and b.state_of(HOST) == "suspended"


async def test_a_hold_that_ends_because_the_count_was_reset_elsewhere_wakes_the_dispatcher(
        spools: list[PostgresSpool]) -> None:
    """Replica a last saw 8 of 10; b's success resets the shared count to 0; a's next two
    failures hold the host (8 seen + 2 unanswered may be the 10th). Their answers (count 1, 2)
    end the hold, and the dispatcher is woken: nothing else would (the held destination's
    deliveries waited for the 60 s recheck; found by a review)."""
    rules = RULES.model_copy(update={"consecutive_failures": 10})
    a, b = (SharedHealth(rules, store=s, probe_lease=30.0, clock=s.clock) for s in spools[:2])
    wakes: list[str] = []
    a.wake = lambda: wakes.append("a")
    for _ in range(8):                                # 8 of 10, answered: a saw 8
        a.record(HOST, True, 1000.0)
        await a.close()
    await b.refresh()
    b.record(HOST, False, 1000.0)                     # a success on b: the count back to 0
    await b.close()
    assert (await row(spools[0]))["consecutive"] == 0
    a.record(HOST, True, 1000.0)
    a.record(HOST, True, 1000.0)                      # 8 seen + 2 unanswered: held
    assert not a.allow(HOST, 1000.0) and a.is_blocked(HOST, 1000.0)
    before = len(wakes)
    await a.close()                                   # answered: counts 1 and 2
    assert a.allow(HOST, 1000.0) and not a.is_blocked(HOST, 1000.0)   # no longer held ...
    assert len(wakes) > before, "the hold ended without waking the dispatcher"


async def test_a_hold_that_ends_because_this_replica_reset_the_count_wakes_the_dispatcher(
        spools: list[PostgresSpool]) -> None:
    """One replica: 8 of 10 seen, two more failures in flight hold the host; a success from a
    request sent before the hold resets the count (RESET answers first). The hold ends when
    the RESET's answer is applied, and that wakes the dispatcher."""
    rules = RULES.model_copy(update={"consecutive_failures": 10})
    (a,) = (SharedHealth(rules, store=s, probe_lease=30.0, clock=s.clock) for s in spools[:1])
    wakes: list[str] = []
    a.wake = lambda: wakes.append("a")
    for _ in range(8):
        a.record(HOST, True, 1000.0)
        await a.close()
    a.record(HOST, False, 1000.0)                     # a success: RESET queued first
    a.record(HOST, True, 1000.0)
    a.record(HOST, True, 1000.0)                      # 8 seen + 2 unanswered: held
    assert not a.allow(HOST, 1000.0)
    before = len(wakes)
    await a.close()
    assert a.allow(HOST, 1000.0)
    assert len(wakes) > before, "the hold ended without waking the dispatcher"


async def test_one_replica_sends_the_probe(spools: list[PostgresSpool]) -> None:
    """When the suspension ends, replicas asking together get one probe between them; its
    success reopens the host for all."""
    a, b, c = boards(spools)
    for _ in range(4):
        a.record(HOST, True, 1000.0)
        await a.close()
    await settle(a, b, c)
    later = 1011.0                                   # suspend_for is 10 s
    assert [board.allow(HOST, later) for board in (a, b, c)] == [False] * 3   # claims asked
    await settle(a, b, c)
    granted = [board.allow(HOST, later) for board in (a, b, c)]
    assert granted.count(True) == 1
    prober = (a, b, c)[granted.index(True)]
    assert [board.allow(HOST, later) for board in (a, b, c)] == [False] * 3   # one probe only
    assert (await row(spools[0]))["probe_owner"] == prober.replica
    prober.record(HOST, False, later + 0.1)
    await settle(a, b, c)
    for board in (a, b, c):
        assert board.allow(HOST, later + 0.2) and board.state_of(HOST) == "healthy"


async def test_failed_probe_suspends_for_longer_and_a_dead_prober_passes_it_on(
        spools: list[PostgresSpool]) -> None:
    """A failed probe suspends the host again for twice as long, for every replica; a probe
    claimed by a replica that then goes silent is taken by another once the claim ends."""
    a, b, _ = boards(spools)
    for _ in range(4):
        a.record(HOST, True, 1000.0)
        await a.close()
    await settle(a, b)
    assert not a.allow(HOST, 1011.0)
    await settle(a, b)
    assert a.allow(HOST, 1011.0)
    a.record(HOST, True, 1011.5)                     # the probe fails
    await settle(a, b)
    assert (await row(spools[0]))["suspended_until"] == pytest.approx(1031.5)
    assert b.blocked_until(HOST) == pytest.approx(1031.5)
    assert not a.allow(HOST, 1032.0)                 # a claims the next probe, never sends it
    await settle(a, b)
    assert a.allow(HOST, 1032.0)
    assert not b.allow(HOST, 1033.0)                 # a holds the probe (claim: 30 s)
    await settle(a, b)
    assert not b.allow(HOST, 1063.0)                 # the claim ended: b asks for it
    await settle(a, b)
    assert b.allow(HOST, 1063.0)


async def test_max_events_counts_across_replicas(spools: list[PostgresSpool]) -> None:
    """spool.max_events (5 here) bounds the events awaiting delivery in the whole database,
    whichever replicas stored them."""
    one, two, _ = spools
    await one.ingest([item(i) for i in range(3)])
    await two.ingest([item(i) for i in range(3, 5)])
    with pytest.raises(SpoolFull):
        await two.ingest([item(9)])
    with pytest.raises(SpoolFull):
        await one.ingest([item(9)])


async def test_prune_runs_on_one_replica_at_a_time(spools: list[PostgresSpool],
                                                   pg_dsn: str) -> None:
    """While one replica holds the prune lock another prunes nothing; then it prunes."""
    one, two, _ = spools
    await one.ingest([item(1)])
    for due in await one.due(1000.0, 10, ["a", "b"]):
        await record(one, due, "delivered")
    clock = one.clock
    assert isinstance(clock, Clock)
    clock.now += 3600
    holder = await asyncpg.connect(pg_dsn)
    try:
        async with holder.transaction():
            assert await holder.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))",
                                         "relay.prune:relay")
            assert await two.prune(60.0) == 0
        assert await two.prune(60.0) == 1
    finally:
        await holder.close()


async def test_a_slow_live_attempt_keeps_its_lease(spools: list[PostgresSpool]) -> None:
    """An attempt as slow as delivery.timeout, on a live replica, is not claimed by another
    (the lease is timeout + margin); its outcome is recorded by the replica that made it."""
    one, two, _ = spools
    await one.ingest([item(1, routes=item(1)[1][:1])])
    (mine,) = await one.due(1000.0, 10, ["a", "b"])
    clock = one.clock
    assert isinstance(clock, Clock)
    clock.now += 59.0                                # the lease is 60 s: the attempt is slow
    assert await two.due(clock.now, 10, ["a", "b"]) == []
    await one.record_attempt(mine, Attempt(clock.now, 59.0, 200, None, None), state="delivered",
                             not_before=None, failures=0, reason=None)
    got = await two.get_delivery(mine.delivery_id)
    assert got is not None and (got.state, got.attempts) == ("delivered", 1)


async def test_a_sender_id_stored_meanwhile_by_another_replica_is_a_duplicate(
        spools: list[PostgresSpool], other: asyncpg.Connection) -> None:
    """A group's one-statement ingest (sql.INGEST) whose sender id another replica commits
    while the statement waits on it: that event is answered as the other's duplicate, with
    its deliveries, and is not stored; the rest of the group is."""
    _, two, _ = spools
    transaction = other.transaction()
    await transaction.start()
    await other.execute("INSERT INTO sender_ids(id, received_at, deliveries) "
                        "VALUES ('e1', 1000.0, 'a dlv_theirs pending')")
    ingest = asyncio.create_task(two.ingest([item(1), item(2)]))
    for _ in range(100):  # until the statement waits on the uncommitted row
        if await other.fetchval("SELECT count(*) FROM pg_stat_activity "
                                "WHERE wait_event_type = 'Lock'"):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the ingest never waited on the other replica's sender id")
    await transaction.commit()
    first, second = await ingest
    assert first.duplicate and first.deliveries == [("a", "dlv_theirs", "pending")]
    assert not second.duplicate and second.id == "e2"
    stored = await other.fetch("SELECT id FROM events ORDER BY seq")
    assert [r["id"] for r in stored] == ["e2"]
    assert await other.fetchval("SELECT count(*) FROM deliveries") == len(second.deliveries)
    assert (await two.stats())["open_events"] == 1


async def test_every_connection_busy_is_not_a_lost_database(
        spools: list[PostgresSpool], other: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Statements waiting on another transaction's lock hold every connection of the claims
    pool: a claim that cannot get one fails with a plain SpoolError, and the spool stays
    writable (a lost database would turn /readyz and ingest to 503)."""
    monkeypatch.setattr(postgres_module, "CONNECT_TIMEOUT", 0.5)
    one = spools[0]
    transaction = other.transaction()
    await transaction.start()
    await other.execute("UPDATE counters SET open_events = open_events")
    waiting = [asyncio.create_task(one.fetch_rows(
        "UPDATE counters SET open_events = open_events RETURNING 1")) for _ in range(2)]
    await asyncio.sleep(0.3)
    with pytest.raises(SpoolError, match="busy"):
        await one.due(1000.0, 10, ["a"])
    assert one.writable and one.unavailable is None
    await transaction.rollback()
    await asyncio.gather(*waiting)
    assert await one.due(1000.0, 10, ["a"]) == []


OLD_NEXT_DUE = """
SELECT min(CASE WHEN lease_owner IS NOT NULL AND lease_owner <> $3 AND lease_until >= $4
                THEN greatest(not_before, lease_until) ELSE not_before END)
FROM deliveries
WHERE state = 'pending' AND destination = ANY($1::text[]) AND seq <> ALL($2::bigint[])
"""


async def test_next_due_walks_two_indexes_to_the_same_answer_as_reading_every_row(
        spools: list[PostgresSpool], other: asyncpg.Connection) -> None:
    """NEXT_DUE (the first due row no other replica holds, and the end of the other replicas'
    leases, by two index walks) answers what one read of every pending row answered, over
    random due times, leases (ours, others', expired) and exclusions. Only pending rows hold
    leases, as in the spool: every statement that ends a delivery clears its lease."""
    one = spools[0]
    await one.ingest([item(i) for i in range(3)])
    rng = random.Random(7)
    seqs = [r[0] for r in await other.fetch("SELECT seq FROM deliveries ORDER BY seq")]
    for _ in range(150):
        for seq in seqs:
            state = rng.choice(["pending", "pending", "delivered"])
            owner = rng.choice([None, None, "r0", "r1", "r2"]) if state == "pending" else None
            await other.execute(
                "UPDATE deliveries SET state = $2, not_before = $3, lease_owner = $4::text, "
                "lease_until = CASE WHEN $4::text IS NULL THEN NULL ELSE $5::float8 END "
                "WHERE seq = $1", seq, state,
                1000.0 + rng.randrange(-50, 50), owner, 1000.0 + rng.randrange(-50, 50))
        args = (rng.sample(["a", "b"], rng.randint(1, 2)),
                rng.sample(seqs, rng.randint(0, 2)), "r0", 1000.0)
        assert await other.fetchval(sql.NEXT_DUE, *args) == \
            await other.fetchval(OLD_NEXT_DUE, *args), args


async def test_a_look_needs_no_ingest_connection(
        pg_dsn: str, other: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A look (claim and next due time) runs on the claims pool: with every other connection
    held by an ingest waiting on a lock, it still hands out what it claimed, complete."""
    monkeypatch.setattr(postgres_module, "CONNECT_TIMEOUT", 0.5)
    spool = PostgresSpool(pg_dsn, replica="r0", clock=Clock(), pool_size=3)  # 1 + 2 for claims
    await spool.open()
    try:
        await spool.ingest([item(i) for i in range(3)])
        transaction = other.transaction()
        await transaction.start()
        await other.execute("UPDATE counters SET open_events = open_events")
        stuck = asyncio.create_task(spool.ingest([item(9)]))   # holds the one other connection
        await asyncio.sleep(0.3)
        batch = await spool.poll(1000.0, 100, ["a", "b"])
        assert len(batch.due) == 6 and batch.complete and batch.next_at is None
        await transaction.rollback()
        await stuck
    finally:
        await spool.close()


async def test_work_other_replicas_must_see_moves_the_work_mark(
        spools: list[PostgresSpool]) -> None:
    """What a replica whose last look was complete must hear of from the others moves
    ``work_mark`` (the follower wakes it then): stored events, a retry, a replay. A delivery
    finished or failed does not (nothing new to send)."""
    one, two, _ = spools
    marks = [await two.work_mark()]

    async def moved() -> bool:
        marks.append(await two.work_mark())
        return marks[-1] != marks[-2]

    await one.ingest([item(1), item(2)])
    assert await moved()
    first, second, third, _ = await one.due(1000.0, 10, ["a", "b"])
    await record(one, first, "delivered")
    assert not await moved()
    await record(one, second, "pending", not_before=1030.0, failures=1)
    assert await moved()
    await record(one, third, "failed", reason="dead")
    assert not await moved()
    assert await one.replay(delivery_ids=[third.delivery_id]) == [third.delivery_id]
    assert await moved()


async def test_claims_given_back_past_a_looks_budget_move_the_work_mark(
        spools: list[PostgresSpool]) -> None:
    """A look that claimed more event JSON than its budget gives the rest back (UNCLAIM): that
    moves ``work_mark`` as a release at close does, so the other replicas' followers hear of
    them should this replica not look again (they waited for other work or the 60 s
    recheck)."""
    one, two, _ = spools
    await one.ingest([item(1), item(2)])
    before = await two.work_mark()
    (kept,) = await one.due(1000.0, 10, ["a", "b"], budget=1)   # one kept, the rest given back
    assert await two.work_mark() != before
    taken = await two.due(1000.0, 10, ["a", "b"])
    assert len(taken) == 3 and kept.seq not in {due.seq for due in taken}


async def test_either_ingest_statement_moves_the_released_counter(
        spools: list[PostgresSpool], other: asyncpg.Connection) -> None:
    """Seqs can commit out of order (an ingest that drew a lower seq commits after one with a
    higher seq), so the newest seq alone could hide an event from the other replicas'
    followers: both ingest statements (INGEST, and INSERT after a claim) also move
    ``counters.released``, the other half of the work mark."""
    two = spools[1]
    for n, statement in enumerate((sql.INGEST, sql.INSERT)):
        events = ([f"e{n}"], [False], [1000.0], [1], [f'{{"id":"e{n}"}}'])
        deliveries = ([f"dlv_{n}"], [1], ["a"], ["pending"], [1000.0], [None], [None])
        args = ([[], [], [], 0.0, *events, *deliveries, "r1", 1, 1000]
                if statement == sql.INGEST else [*events, *deliveries, "r1", 1])
        before = await two.work_mark()
        await other.fetch(statement, *args)
        after = await two.work_mark()
        assert after[1] == before[1] + 1, statement[:30]


async def test_a_look_gives_the_next_due_time_of_what_it_did_not_claim(
        spools: list[PostgresSpool]) -> None:
    """One statement (LOOK) claims what is due and answers when the next of the rest can be
    claimed: a retry's not_before, or the end of another replica's lease, never the rows it
    just claimed (due already)."""
    one, two, _ = spools
    await one.ingest([item(1), item(2), item(3)])
    first, second, *_ = await one.due(1000.0, 2, ["a", "b"])    # one holds two until 1060
    await record(one, first, "pending", not_before=1030.0, failures=1)
    batch = await two.poll(1000.0, 100, ["a", "b"])
    assert len(batch.due) == 4 and batch.complete and batch.next_at == 1030.0
    again = await two.poll(1031.0, 100, ["a", "b"])     # the retry, and its own claims
    assert {d.seq for d in again.due} == {first.seq} | {d.seq for d in batch.due}
    assert again.complete and again.next_at == 1060.0     # when one's lease on the other ends
    assert second.seq not in {d.seq for d in again.due}
