"""Offers on PostgreSQL: a replica stores the deliveries of the events it ingests leased to
itself and starts them from memory, as the SQLite relay does, with no claim statement per
event. No other replica can take them; this replica's own looks can, so what the looks
overlapping an ingest claimed is never queued again from its offer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.config.load import load_config
from relay.dispatch import LOOK_HISTORY, Dispatcher
from relay.events import Event, accept
from relay.routing import Route
from relay.server import create_app
from relay.spool.backends import open_spool
from relay.spool.postgres import PostgresSpool
from tests.helpers import Stack, async_eventually, event, write_config
from tests.pg import pg_dsn, pg_server
from tests.receiver import Receiver, receiver_config
from tests.test_spool_contract import Clock, item, record

__all__ = ["pg_dsn", "pg_server"]  # fixtures used here


# -- the spool ------------------------------------------------------------------------------

async def test_offered_deliveries_are_leased_to_the_ingesting_replica(pg_dsn: str) -> None:
    """With a mark, an ingest's pending deliveries come back in the receipt (``fresh``, the
    events' bodies and the mark) and are stored leased to this replica: another replica
    cannot claim them, this one's look can, its outcome applies, and close() gives the rest
    to the others at once. Without a mark they are any replica's."""
    clock = Clock()
    one = PostgresSpool(pg_dsn, replica="one", lease=60.0, clock=clock)
    two = PostgresSpool(pg_dsn, replica="two", lease=60.0, clock=clock)
    await one.open()
    await two.open()
    try:
        one.offers = lambda: 7
        receipt = await one.ingest_receipt([item(1), item(2)])
        assert receipt.mark == 7 and len(receipt.fresh) == 4 and len(receipt.bodies) == 2
        dues = receipt.dues()
        assert {(d.destination, d.attempts) for d in dues} == {("a", 0), ("b", 0)}
        assert [d.event_json for d in dues][:2] == [receipt.bodies[0]] * 2
        ids = {did for entry in receipt.entries() for _, did, _ in entry.deliveries}
        assert {d.delivery_id for d in dues} == ids
        assert await two.due(1000, 10, ["a", "b"]) == []         # leased to one
        claimed = await one.due(1000, 10, ["a", "b"])            # one's own look may claim
        assert sorted((d.seq, d.event_seq, d.delivery_id, d.event_json) for d in claimed) == \
            sorted((d.seq, d.event_seq, d.delivery_id, d.event_json) for d in dues)
        await record(one, dues[0], "delivered")
        got = await one.get_delivery(dues[0].delivery_id)
        assert got is not None and (got.state, got.attempts) == ("delivered", 1)
        one.offers = lambda: None                                # not offered: anyone's
        plain = await one.ingest_receipt([item(3)])
        assert (list(plain.fresh), plain.mark) == ([], None)
        theirs = await two.due(1000, 10, ["a", "b"])
        assert len(theirs) == 2
        await one.close()                                        # the offered rest: released
        assert len(await two.due(1000, 10, ["a", "b"], [d.seq for d in theirs])) == 3
    finally:
        await one.close()
        await two.close()


async def test_offers_survive_the_checked_ingest_path(pg_dsn: str) -> None:
    """A group with a repeated sender id runs as a transaction (CLAIM, then INSERT): its new
    deliveries are leased and offered too, its repeats are not."""
    spool = PostgresSpool(pg_dsn, replica="one", clock=Clock())
    await spool.open()
    try:
        spool.offers = lambda: 0
        await spool.ingest([item(1)])
        receipt = await spool.ingest_receipt([item(1), item(2)])   # e1 repeats: checked path
        assert (receipt.stored, receipt.duplicates) == (1, 1)
        assert {(index, destination) for index, _, _, _, destination in receipt.fresh} == \
            {(1, "a"), (1, "b")}
        owners = await spool.fetch_rows(
            "SELECT lease_owner FROM deliveries WHERE event_seq = $1", receipt.fresh[0][1])
        assert [row[0] for row in owners] == ["one", "one"]
    finally:
        await spool.close()


# -- the dispatcher -------------------------------------------------------------------------

@pytest.fixture
async def pg_stack(tmp_path: Path, pg_dsn: str, aiohttp_client: Any
                   ) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """``await pg_stack(**sections)``: a PostgreSQL spool, its dispatcher wired for offers as
    relay/service.py wires it, and the relay's app, in this loop; stopped after the test."""
    made: list[Stack] = []

    async def make(**sections: Any) -> Stack:
        config = load_config(write_config(
            tmp_path, spool={"backend": "postgres", "postgres": {"dsn": pg_dsn}}, **sections),
            env={})
        spool = open_spool(config.spool)
        await spool.open()
        assert isinstance(spool, PostgresSpool)
        dispatcher = Dispatcher(config, spool)
        spool.offers = dispatcher.offer_mark
        await dispatcher.start()
        stack = Stack(config, await aiohttp_client(create_app(config, spool, dispatcher)),
                      spool, dispatcher)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        await stack.stop()


async def _stored(stack: Stack, *numbers: int) -> Any:
    """Store events for "braze" as the server's ingest does, but keep the offer: the
    receipt, and ``"<event id>/braze" -> delivery id``."""
    receipt = await stack.spool.ingest_receipt([
        (accept(Event(id=f"evt-{i}", channel="email", status="sent", message_id=f"m{i}"),
                time.time()), (Route("braze", "pending"),)) for i in numbers])
    return receipt, {f"{entry.id}/{destination}": delivery_id for entry in receipt.entries()
                     for destination, delivery_id, _ in entry.deliveries}


async def _looked(dispatcher: Dispatcher) -> None:
    """Wake the dispatcher and wait for its look."""
    before = dispatcher._looks
    dispatcher.wake()
    await async_eventually(lambda: dispatcher._looks > before, what="a look")


def _braze(receiver: Receiver) -> dict[str, Any]:
    return receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}])


def _counting(dispatcher: Dispatcher, calls: list[str]) -> None:
    spool = dispatcher.spool

    class Counting:
        def __getattr__(self, name: str) -> Any:
            if name in ("poll", "due", "next_due_at"):
                calls.append(name)
            return getattr(spool, name)

    dispatcher.spool = Counting()


async def _sent_once(stack: Stack, receiver: Receiver, ids: dict[str, str]) -> None:
    for delivery_id in ids.values():
        await stack.settle(delivery_id, "delivered")
    await asyncio.sleep(0.3)             # a second send would have arrived by now
    got = receiver.received("/braze")
    assert sorted(r.headers["Webhook-Id"] for r in got) == sorted(ids.values())
    for delivery_id in ids.values():
        assert (await stack.delivery(delivery_id))["attempt_count"] == 1


async def test_events_at_a_trickle_start_without_a_claim(pg_stack: Any,
                                                         receiver: Receiver) -> None:
    """Each event is delivered before the next arrives: offered from memory, not claimed by
    a look. (Every event cost a claim statement before: 20 looks for these 20 events.)"""
    stack = await pg_stack(**_braze(receiver))
    await async_eventually(lambda: stack.dispatcher.offer_mark() is not None,
                           what="a first complete look")
    reads: list[str] = []
    _counting(stack.dispatcher, reads)
    ids: dict[str, str] = {}
    for i in range(20):
        posted = await stack.post(event(i))
        await stack.settle(posted[f"evt-{i}/braze"], "delivered")
        ids |= posted
    await _sent_once(stack, receiver, ids)
    assert len(reads) <= 2, reads


async def test_a_look_that_claimed_offered_rows_first_hands_them_out_alone(
        pg_stack: Any, receiver: Receiver) -> None:
    """A look that begins while an ingest is on its way may claim its rows (this replica's
    lease does not stop it) and send them before the ingest's offer comes: the offer then
    leaves those rows out. Here the look delivers them before the offer is made."""
    stack = await pg_stack(**_braze(receiver))
    dispatcher, spool = stack.dispatcher, stack.spool
    await async_eventually(lambda: dispatcher.offer_mark() is not None,
                           what="a first complete look")
    receipt, ids = await _stored(stack, 1, 2, 3)   # the offer is kept back
    assert receipt.mark is not None and len(receipt.fresh) == 3
    dispatcher.wake()                    # a look claims them and sends them
    for delivery_id in ids.values():
        await stack.settle(delivery_id, "delivered")
    dispatcher.offer(receipt)            # late
    await _sent_once(stack, receiver, ids)
    assert spool.writable


async def test_an_ingest_queued_during_a_look_is_sent_once(pg_stack: Any,
                                                           receiver: Receiver) -> None:
    """Events stored while a look reads are offered with that look among those that may
    have claimed them; the look, slowed here, reads them as due: each is sent once."""
    stack = await pg_stack(**_braze(receiver))
    dispatcher = stack.dispatcher
    await async_eventually(lambda: dispatcher.offer_mark() is not None,
                           what="a first complete look")
    spool, looks = dispatcher.spool, []

    class SlowLook:
        def __getattr__(self, name: str) -> Any:
            return getattr(spool, name)

        async def poll(self, now: float, *args: Any, **kwargs: Any) -> Any:
            looks.append(now)
            await asyncio.sleep(0.3)     # the events below are stored meanwhile
            return await spool.poll(time.time(), *args, **kwargs)

    dispatcher.spool = SlowLook()      
    dispatcher.wake()
    await async_eventually(lambda: len(looks), what="a look")
    ids = await stack.post(*(event(i) for i in range(5)))
    await _sent_once(stack, receiver, ids)


async def test_an_offer_older_than_the_looks_remembered_is_a_wake_up(
        pg_stack: Any, receiver: Receiver) -> None:
    """An offer whose ingest was overlapped by more looks than are remembered cannot tell
    what they claimed: it takes nothing and wakes the loop, and a look hands its rows out,
    once."""
    stack = await pg_stack(**_braze(receiver))
    dispatcher = stack.dispatcher
    await async_eventually(lambda: dispatcher.offer_mark() is not None,
                           what="a first complete look")
    receipt, ids = await _stored(stack, 1)
    for _ in range(LOOK_HISTORY + 2):    # the first claims the row and sends it
        await _looked(dispatcher)
    await stack.settle(ids["evt-1/braze"], "delivered")
    dispatcher.offer(receipt)
    await _sent_once(stack, receiver, ids)


async def test_a_replica_with_every_slot_busy_leaves_its_new_deliveries_to_the_others(
        pg_stack: Any, receiver: Receiver) -> None:
    """Offered rows are leased to the replica that stored them: one whose request slots are
    all taken stores them for any replica (no mark), so another can send them at once."""
    stack = await pg_stack(**receiver_config(receiver, delivery={"concurrency": 1},
                                             destinations=[{"name": "braze", "format": "braze",
                                                            "url": f"{receiver.url}/braze"}]))
    dispatcher = stack.dispatcher
    await async_eventually(lambda: dispatcher.offer_mark() is not None,
                           what="a first complete look")
    dispatcher._requesting[-1] = ("http://127.0.0.1:1", False)   # its one slot: taken
    try:
        assert dispatcher.offer_mark() is None
        receipt, _ = await _stored(stack, 1)
        assert (list(receipt.fresh), receipt.mark) == ([], None)
        other = PostgresSpool(stack.spool.dsn, replica="other")
        await other.open()
        try:
            assert len(await other.due(time.time(), 10, ["braze"])) == 1
        finally:
            await other.close()
    finally:
        del dispatcher._requesting[-1]
