"""PostgreSQL offers: what a replica leases to itself is what it would start at once (its free
request slots, shared by a host's destinations and by all; its rate limit's tokens; not for a
held host), and what it stores for any replica it looks for too, without costing the other
destinations their offers. (From a review of 3d0d25f and 36ad549: each test failed there.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from relay.errors import SpoolError
from relay.events import Event, accept
from relay.health_shared import UNCONFIRMED_MAX
from relay.routing import Route
from relay.spool import postgres_sql as sql
from relay.spool.postgres import PostgresSpool
from relay.spool.receipt import pack
from tests.helpers import async_eventually
from tests.pg import pg_dsn, pg_server
from tests.receiver import Answer, Receiver, receiver_config
from tests.test_postgres_offers import _claimable_elsewhere, _complete, _counting, pg_stack
from tests.test_spool_contract import Clock

__all__ = ["pg_dsn", "pg_server", "pg_stack"]  # fixtures used here


def _ev(i: int, *destinations: str, sender: bool = True) -> tuple[Any, tuple[Route, ...]]:
    return (accept(Event(id=f"evt-{i}" if sender else None, channel="email", status="sent",
                         message_id=f"m{i}"), time.time()),
            tuple(Route(d, "pending") for d in destinations))


def _ids(receipt: Any) -> dict[str, str]:
    return {f"{entry.id}/{dest}": did for entry in receipt.entries()
            for dest, did, _ in entry.deliveries}


async def _owners(spool: PostgresSpool) -> dict[str, str | None]:
    rows = await spool.fetch_rows("SELECT delivery_id, lease_owner FROM deliveries "
                                  "WHERE state = 'pending'")
    return {row[0]: row[1] for row in rows}


def _two_hosts(a: Receiver, b: Receiver, **delivery: Any) -> dict[str, Any]:
    return {"delivery": {"allowed_ports": [a.port, b.port], "allowed_networks": ["127.0.0.0/8"],
                         "timeout": "10s", **delivery},
            "destinations": [{"name": "a", "format": "braze", "url": f"{a.url}/a"},
                             {"name": "b", "format": "braze",
                              "url": f"http://localhost:{b.port}/b"}]}


# -- 1. the unoffered flag on the raced ingest path ------------------------------------------

async def _raced_ingest(spool: PostgresSpool, dsn: str, events: list[Any],
                        raced_id: str) -> Any:
    """Ingest ``events`` while another transaction inserts ``raced_id`` in sender_ids and
    commits after INGEST's snapshot: INGEST leaves that event out (the raced path)."""
    other = await asyncpg.connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("INSERT INTO relay.sender_ids(id, received_at, deliveries) "
                            "VALUES ($1, $2, $3)", raced_id, time.time(),
                            pack([("a", "0" * 32, "pending")]))
        task = asyncio.ensure_future(spool.ingest_receipt(events))
        await asyncio.sleep(0.5)
        assert not task.done()            # INGEST waits on the other's sender id
        await tx.commit()
        return await asyncio.wait_for(task, 10)
    finally:
        await other.close()


async def _offer_one_event(stack: Any, destinations: list[str],
                           sent: Callable[[], int]) -> tuple[Any, list[Any]]:
    """One event to ``destinations``, each covered by a look, ingested and offered; once its
    first request has arrived (``sent``): offer_mark's answer, and the rows another replica
    could claim."""
    await _complete(stack.dispatcher, *destinations)
    mark = stack.dispatcher.offer_mark(dict.fromkeys(destinations, 1))
    stack.dispatcher.offer(await stack.spool.ingest_receipt([_ev(1, *destinations)]))
    await async_eventually(lambda: sent() == 1, what="the first send")
    return mark, await _claimable_elsewhere(stack.spool, destinations)


async def test_raced_sender_id_receipt_says_unoffered_when_rows_are_any_replicas(
        pg_dsn: str) -> None:
    """evt-1's sender id is stored by another replica after INGEST's snapshot, so the
    statement leaves evt-1 out. Its lease bookkeeping had given evt-1/a the one slot of "a",
    so evt-2/a was stored for any replica: the receipt says so (``unoffered``), worked out
    from what was stored. (It was worked out again from a second assembly, where evt-2/a had
    the slot, and said nothing.)"""
    spool = PostgresSpool(pg_dsn, replica="one", clock=Clock(time.time()))
    await spool.open()
    try:
        spool.offers = lambda names: (0, dict.fromkeys(names, 1))
        receipt = await _raced_ingest(spool, pg_dsn, [_ev(1, "a"), _ev(2, "a", "b",
                                                                        sender=False)],
                                      "evt-1")
        assert (receipt.stored, receipt.duplicates) == (1, 1)
        (stored,) = [e for e in receipt.entries() if not e.duplicate]
        evt2_a = next(did for dest, did, _ in stored.deliveries if dest == "a")
        owners = await _owners(spool)
        assert owners[evt2_a] is None      # evt-2/a: any replica's
        assert [entry[4] for entry in receipt.fresh] == ["b"]   # evt-2/b: offered
        assert receipt.unoffered == {"a"}, ("evt-2/a was stored for any replica, yet the "
                                            "receipt says every pending delivery was offered")
    finally:
        await spool.close()


async def test_raced_sender_id_strands_the_unoffered_row_on_a_lone_replica(
        pg_stack: Any, receivers: Any, pg_dsn: str) -> None:
    """End to end on one replica (no follower, as in the offers tests): the raced path's
    evt-2/a, stored for any replica, is looked for and sent (it waited for the 60 s
    recheck)."""
    ra, rb = receivers(), receivers()
    stack = await pg_stack(**_two_hosts(ra, rb, per_host_concurrency=1))
    dispatcher = stack.dispatcher
    await _complete(dispatcher, "a", "b")
    assert dispatcher.offer_mark({"a": 2, "b": 1}) == (dispatcher._looks, {"a": 1, "b": 1})
    receipt = await _raced_ingest(stack.spool, pg_dsn,
                                  [_ev(1, "a"), _ev(2, "a", "b", sender=False)], "evt-1")
    assert receipt.pending
    dispatcher.offer(receipt)             # as the server does
    await async_eventually(lambda: len(rb.received("/b")) == 1, what="evt-2/b sent")
    await asyncio.sleep(3.0)
    assert len(ra.received("/a")) == 1, (
        "evt-2/a (stored for any replica) was not sent within 3 s: nothing woke this "
        f"replica's loop for it (receipt.unoffered={receipt.unoffered}, covered="
        f"{sorted(dispatcher._covered)})")


# -- 2. free slots are counted per destination, not shared ------------------------------------

async def test_destinations_of_one_host_share_its_free_slots(pg_stack: Any,
                                                             receivers: Any) -> None:
    """Two destinations on one host with per_host_concurrency 1: one delivery can start here
    at once, so one is leased and the other left to any replica. (Each destination was given
    the host's free slot.)"""
    slow = receivers(Answer(delay=3.0))
    stack = await pg_stack(
        delivery={"allowed_ports": [slow.port], "allowed_networks": ["127.0.0.0/8"],
                  "per_host_concurrency": 1, "timeout": "10s"},
        destinations=[{"name": "one", "format": "braze", "url": f"{slow.url}/one"},
                      {"name": "two", "format": "braze", "url": f"{slow.url}/two"}])
    mark, taken = await _offer_one_event(stack, ["one", "two"], lambda: len(slow.received()))
    assert len(taken) == 1, (
        f"offer_mark {mark}: both deliveries were leased to a replica with one slot at "
        f"the host; the one not started waits for it ({await _owners(stack.spool)})")


async def test_destinations_of_two_hosts_share_the_free_request_slots(
        pg_stack: Any, receivers: Any) -> None:
    """delivery.concurrency 1: one delivery starts at once here whatever its host, so one is
    leased. (Each destination was given every free slot.)"""
    ra, rb = receivers(Answer(delay=3.0)), receivers(Answer(delay=3.0))
    stack = await pg_stack(**_two_hosts(ra, rb, concurrency=1))
    mark, taken = await _offer_one_event(
        stack, ["a", "b"], lambda: len(ra.received()) + len(rb.received()))
    assert len(taken) == 1, (
        f"offer_mark {mark} with one request slot: both leased here "
        f"({await _owners(stack.spool)})")


async def test_a_rate_limited_destination_leases_no_more_than_its_tokens(
        pg_stack: Any, receiver: Receiver) -> None:
    """A destination with one token (0.2/s, burst 1) here: one delivery starts at once, so one
    is leased and three are any replica's. (Four were leased for one token, and waited here
    for tokens 5 s apart while no other replica could take them.)"""
    stack = await pg_stack(
        delivery={"allowed_ports": [receiver.port], "allowed_networks": ["127.0.0.0/8"],
                  "per_host_concurrency": 4, "timeout": "10s"},
        destinations=[{"name": "braze", "format": "braze", "url": f"{receiver.url}/braze",
                       "rate_limit": {"per_second": 0.2, "burst": 1}}])
    dispatcher, spool = stack.dispatcher, stack.spool
    await _complete(dispatcher, "braze")
    mark = dispatcher.offer_mark({"braze": 4})
    receipt = await spool.ingest_receipt([_ev(i, "braze") for i in range(1, 5)])
    dispatcher.offer(receipt)
    await async_eventually(lambda: len(receiver.received()) == 1, what="the first send")
    taken = await _claimable_elsewhere(spool, ["braze"])
    assert len(taken) == 3, (
        f"offer_mark {mark}: {len(receipt.fresh)} leased for one token "
        f"({await _owners(spool)})")


# -- 3. a shared-health hold -------------------------------------------------------------------

async def test_a_host_held_by_shared_health_gets_no_leased_rows(pg_stack: Any,
                                                                receiver: Receiver) -> None:
    """While this replica's failures are on their way to the hosts table, SharedHealth holds
    the host here (is_blocked): nothing is leased to this replica for it."""
    stack = await pg_stack(
        shared_health=True,
        delivery={"allowed_ports": [receiver.port], "allowed_networks": ["127.0.0.0/8"],
                  "timeout": "10s"},
        destinations=[{"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}])
    dispatcher = stack.dispatcher
    await _complete(dispatcher, "braze")
    host = dispatcher.destinations["braze"].host
    assert host is not None
    dispatcher.health._unconfirmed[host] = UNCONFIRMED_MAX   # as record() does on failures
    assert dispatcher.health.is_blocked(host, time.time())
    mark = dispatcher.offer_mark({"braze": 4})
    try:
        assert mark is None, f"offer_mark {mark} for a host this replica holds"
    finally:
        dispatcher.health._unconfirmed.pop(host, None)


# -- 4. a destination held back costs the others their offers ---------------------------------

async def test_a_suspended_destination_does_not_turn_every_offer_into_a_look(
        pg_stack: Any, receivers: Any) -> None:
    """Events for a live destination and one whose host is suspended: the live one's rows are
    offered; the suspended one's are stored for any replica and looked for when the host
    reopens, without a look per event for the live one (a first fix woke the loop for them
    and forgot every destination's coverage: 10 looks for 10 events)."""
    live, dead = receivers(), receivers()
    stack = await pg_stack(**_two_hosts(live, dead))
    dispatcher = stack.dispatcher
    key = dispatcher.destinations["b"].host
    health = dispatcher.health
    health._suspend(health.host(key), time.time())
    await _complete(dispatcher, "a")
    reads: list[str] = []
    _counting(dispatcher, reads)
    for i in range(10):
        receipt = await stack.spool.ingest_receipt([_ev(i, "a", "b")])
        dispatcher.offer(receipt)
        await stack.settle(_ids(receipt)[f"evt-{i}/a"], "delivered")
    assert len(reads) <= 2, f"{len(reads)} looks for 10 events: {reads}"


# -- 5. SQLite: unchanged ---------------------------------------------------------------------

async def test_sqlite_receipts_carry_no_mark_and_are_never_unoffered(make_stack: Any,
                                                                     receiver: Receiver) -> None:
    stack = await make_stack(**receiver_config(receiver), dispatch=False)
    receipt = await stack.spool.ingest_receipt([_ev(1, "braze"), _ev(2, "braze")])
    assert receipt.mark is None and not receipt.unoffered and len(receipt.fresh) == 2


async def test_raced_sender_id_not_read_back_never_answers_deliveries_not_stored(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """evt-1's sender id is stored by another transaction after INGEST's snapshot (the raced
    path) and is gone when SENDER_IDS reads it back (pruned meanwhile; a read error gives the
    same): the job is answered 503, never with deliveries that were not stored. (It got a 202
    naming evt-1's planned deliveries: _assemble had added the group's own sender ids to
    ``known`` before the check.)"""
    spool = PostgresSpool(pg_dsn, replica="one", clock=Clock(time.time()))
    await spool.open()
    try:
        spool.offers = lambda wanted: (0, dict(wanted))
        monkeypatch.setattr(sql, "SENDER_IDS", "SELECT id, deliveries FROM sender_ids "
                                               "WHERE false AND id = ANY($1::text[])")
        with pytest.raises(SpoolError, match="pruned meanwhile"):
            await _raced_ingest(spool, pg_dsn, [_ev(1, "a"), _ev(2, "b", sender=False)],
                                "evt-1")
    finally:
        await spool.close()


async def test_offered_rows_in_the_ready_queue_count_against_their_hosts_slots(
        pg_stack: Any, receivers: Any) -> None:
    """per_host_concurrency 1: ingest 1's row is offered and waits in the ready queue (the
    loop has not run) when ingest 2 is queued: the host's one slot is spoken for, so ingest
    2's row is any replica's. (It was leased here too and waited behind the first request,
    3 s, while no other replica could claim it.)"""
    slow = receivers(Answer(delay=3.0))
    stack = await pg_stack(
        delivery={"allowed_ports": [slow.port], "allowed_networks": ["127.0.0.0/8"],
                  "per_host_concurrency": 1, "concurrency": 10, "timeout": "10s"},
        destinations=[{"name": "one", "format": "braze", "url": f"{slow.url}/one"}])
    dispatcher, spool = stack.dispatcher, stack.spool
    await _complete(dispatcher, "one")
    first = await spool.ingest_receipt([_ev(1, "one")])
    dispatcher.offer(first)               # ready, not started: the loop has not run yet
    assert len(dispatcher._ready) == 1 and not dispatcher._requesting
    mark = dispatcher.offer_mark({"one": 1})
    second = await spool.ingest_receipt([_ev(2, "one")])   # offer_mark runs before any await
    dispatcher.offer(second)
    await async_eventually(lambda: len(slow.received()) == 1, what="the first send")
    taken = await _claimable_elsewhere(spool, ["one"])
    assert len(taken) == 1, (
        f"offer_mark {mark} with the host's one slot already spoken for by a ready row: "
        f"ingest 2's row was leased here too ({len(second.fresh)} fresh; "
        f"{await _owners(spool)})")
