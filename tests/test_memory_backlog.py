"""A burst faster than its receiver is delivered from memory, not read back from the spool.

SQLite: the deliveries an ingest offers to the dispatcher join its ready queue while their
host is busy (at ``per_host_concurrency``), up to READY_ROWS / READY_BYTES, and wait there for
a request slot. Before, an offer for a busy host was refused and forgotten what the last look
had covered: from then on every delivery of the burst was read back by looks (bench/e2e.py:
127 looks of 256 rows for 40,000 events, the relay 0.47-0.61 of the forwarder's delivered
events a second; 0.75 after). Real spool, real dispatcher, real aiohttp receivers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from relay import dispatch
from tests.helpers import event
from tests.receiver import Answer, Receiver, receiver_config

BURST = 400


def looks(dispatcher: Any) -> list[tuple[str, ...]]:
    """The destinations asked for by every look of ``dispatcher`` from now on."""
    asked: list[tuple[str, ...]] = []
    spool = dispatcher.spool
    poll = spool.poll

    async def counting(now: float, limit: int, names: Any, *args: Any) -> Any:
        asked.append(tuple(names))
        return await poll(now, limit, names, *args)

    spool.poll = counting
    return asked


async def burst(stack: Any, count: int, start: int = 0, **fields: Any) -> dict[str, str]:
    posted: dict[str, str] = {}
    for first in range(start, start + count, 50):
        posted.update(await stack.post(*(event(i, **fields) for i in range(first, first + 50))))
    return posted


def only(receiver: Receiver) -> list[dict[str, Any]]:
    return [{"name": "braze", "format": "braze", "url": f"{receiver.url}/braze",
             "channels": ["email"]}]


def sent_once(receiver: Receiver, path: str, posted: dict[str, str]) -> None:
    sent = Counter(r.headers["Webhook-Id"] for r in receiver.received(path))
    assert set(sent) == set(posted.values())
    assert max(sent.values()) == 1, [k for k, n in sent.items() if n > 1]


async def test_a_burst_beyond_a_busy_host_is_sent_from_memory(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """2,000 events posted at once to a receiver taking 5 ms a request, 4 at a time: the host
    is busy through the whole burst. Every delivery is sent once, and the spool is read a few
    times at most (before: 21 looks, one for every 256 deliveries or fewer: each offer
    refused while the host was busy was left to them)."""
    slow = receivers(Answer(delay=0.005))
    slow.set_default(Answer(delay=0.005))
    stack = await make_stack(**receiver_config(
        slow, delivery={"allowed_ports": [slow.port], "concurrency": 16,
                        "per_host_concurrency": 4}, destinations=only(slow)))
    asked = looks(stack.dispatcher)
    posted = await burst(stack, 5 * BURST)
    await slow.await_for(5 * BURST, timeout=60)
    await asyncio.sleep(0.3)   # a second send of any of them would be in by now
    sent_once(slow, "", posted)
    assert len(asked) <= 3, f"{len(asked)} looks for a burst offered from memory"


async def test_offers_past_the_memory_bound_are_read_back(
        make_stack: Any, receivers: Callable[..., Receiver],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for 64 deliveries in memory, a burst of 400 to a busy host: what does not
    fit is left to the looks, the ready queue never holds more than the bound and one look,
    and every delivery is sent once."""
    monkeypatch.setattr(dispatch, "READY_ROWS", 64)
    slow = receivers(Answer(delay=0.01))
    slow.set_default(Answer(delay=0.01))
    stack = await make_stack(**receiver_config(
        slow, delivery={"allowed_ports": [slow.port], "concurrency": 16,
                        "per_host_concurrency": 4}, destinations=only(slow)))
    dispatcher = stack.dispatcher
    asked = looks(dispatcher)
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, len(dispatcher._ready))
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        posted = await burst(stack, BURST)
        await slow.await_for(BURST, timeout=30)
    finally:
        watcher.cancel()
    await asyncio.sleep(0.3)
    sent_once(slow, "", posted)
    assert asked, "every delivery came from memory: the bound did not hold"
    assert 0 < most <= 64 + dispatch.PREFETCH, most


async def test_another_destinations_retry_is_not_held_behind_a_backlog_in_memory(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """A backlog of 400 for a busy host waits in memory (about 4 s of work). Another
    destination's delivery fails once and falls due again 0.2 s later: its retry goes out
    then, not after the backlog."""
    slow = receivers(Answer(delay=0.04))
    slow.set_default(Answer(delay=0.04))
    flaky = receivers()
    flaky.answer(Answer(503))   # once; then 200
    stack = await make_stack(**receiver_config(
        slow, delivery={"allowed_ports": [slow.port, flaky.port], "concurrency": 16,
                        "per_host_concurrency": 4, "backoff_initial": "200ms",
                        "backoff_max": "200ms"},
        destinations=[
            {"name": "backlog", "format": "braze", "url": f"{slow.url}/backlog",
             "channels": ["email"]},
            {"name": "other", "format": "braze", "url": f"{flaky.url}/other",
             "channels": ["sms"]}]))
    retried = await stack.post(event(9999, channel="sms", recipient={"phone": "+15550100"}))
    await flaky.await_for(1, "/other", timeout=5)   # failed once: due again in 0.2 s
    posted = await burst(stack, BURST)
    await flaky.await_for(2, "/other", timeout=5)
    before = len(slow.received("/backlog"))
    assert before < BURST // 2, f"the retry waited for {before} of {BURST} backlog deliveries"
    await stack.settle(retried["evt-9999/other"], "delivered")
    await slow.await_for(BURST, "/backlog", timeout=30)
    await asyncio.sleep(0.3)
    sent_once(slow, "/backlog", posted)
