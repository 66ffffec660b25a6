"""Looks aside (relay/dispatch.py ``_look_aside``) read only destinations whose new events
wait for a read: never, round after round, destinations with nothing due. Written by the
review of the fairness change (helper-29), which found both storms: after every retry (each
forgets what the last look covered), and once IDLE_RECHECK had passed without a full look
(looks aside kept the ready queue from emptying), every round looked aside at every idle
destination: 140 reads of an idle one in a second, against 0 before the change."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from relay.config import load_config
from relay.dispatch import Dispatcher
from relay.request import Exchange, Request
from relay.spool import Spool
from tests.helpers import write_config
from tests.test_backlog_looks import item


async def backlogged(tmp_path: Path, names: tuple[str, ...], backlog: tuple[str, ...],
                     **sections: Any) -> tuple[Any, Spool]:
    """A config of braze destinations ``names`` (at https://<name>.example.com) and its open
    SQLite spool, holding 3,000 due deliveries for each destination of ``backlog``."""
    config = load_config(write_config(
        tmp_path, destinations=[{"name": n, "format": "braze",
                                 "url": f"https://{n}.example.com/hook"} for n in names],
        **sections), env={})
    spool = Spool(config.spool.path)
    await spool.open()
    for name in backlog:
        await spool.ingest([item(i, name) for i in range(3000)])
    return config, spool


def counted(spool: Spool) -> list[tuple[str, ...]]:
    """The destinations of every look at ``spool`` from now on."""
    asked: list[tuple[str, ...]] = []
    poll = spool.poll

    async def counting(now: float, limit: int, names: Any, *args: Any) -> Any:
        asked.append(tuple(names))
        return await poll(now, limit, names, *args)

    spool.poll = counting  # type: ignore[method-assign]
    return asked


class Failing:
    def __init__(self) -> None:
        self.sent = 0

    async def handle_request(self, request: Request, timeout: float) -> Exchange:
        await asyncio.sleep(0.005)
        self.sent += 1
        return Exchange(0.0, 0.001, 503, {}, "busy")


async def test_retries_do_not_make_every_round_look_at_idle_destinations(tmp_path: Path) -> None:
    config, spool = await backlogged(
        tmp_path, ("a", "c"), ("a",),
        delivery={"concurrency": 8, "per_host_concurrency": 8, "backoff_initial": "10s",
                  "backoff_max": "10s"},
        health={"consecutive_failures": 1000000, "min_failures": 1000000})
    transport = Failing()
    dispatcher = Dispatcher(config, spool, transport=transport)
    asked = counted(spool)
    await dispatcher.start()
    try:
        await asyncio.sleep(1.0)
        idle = sum(names == ("c",) for names in asked)
        assert idle == 0, (idle, len(asked), transport.sent)
        assert transport.sent > 100   # retries were recorded meanwhile
    finally:
        await dispatcher.stop(1)
        await spool.close()


class Hosts:
    """a.example.com answers in 40 ms, b.example.com in 5 ms."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def handle_request(self, request: Request, timeout: float) -> Exchange:
        await asyncio.sleep(0.04 if "//a." in request.url else 0.005)
        self.sent.append(request.url)
        return Exchange(0.0, 0.001, 200, {}, "ok")


async def test_no_look_aside_at_an_idle_destination_every_round_after_idle_recheck(
        tmp_path: Path) -> None:
    config, spool = await backlogged(tmp_path, ("a", "b", "c"), ("a", "b"),
                                     delivery={"concurrency": 8, "per_host_concurrency": 2})
    offset = [0.0]
    transport = Hosts()
    dispatcher = Dispatcher(config, spool, transport=transport,
                            clock=lambda: time.time() + offset[0])
    asked = counted(spool)
    await dispatcher.start()
    try:
        await asyncio.sleep(1.0)
        before = sum(names == ("c",) for names in asked)
        offset[0] = 61.0          # the backlog has been draining for over IDLE_RECHECK
        await asyncio.sleep(1.0)
        after = sum(names == ("c",) for names in asked) - before
        # c has nothing due and gets no events: no look aside reads it
        assert before + after == 0, (before, after, len(asked), len(transport.sent))
        assert len(transport.sent) > 100   # the backlogs drained meanwhile
    finally:
        await dispatcher.stop(1)
        await spool.close()


class Slow:
    """a.example.com takes 0.2 s a request, b.example.com answers at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, float]] = []

    async def handle_request(self, request: Request, timeout: float) -> Exchange:
        if "//a." in request.url:
            await asyncio.sleep(0.2)
        self.sent.append((request.url, time.monotonic()))
        return Exchange(0.0, 0.001, 200, {}, "ok")


async def test_events_another_worker_stored_are_read_beside_a_backlog(tmp_path: Path) -> None:
    """With server.workers > 1 on SQLite, worker 0 dispatches and learns of the other
    workers' events only from the writer's wake, which names no destination: gated on offers
    of its own, looks aside never read them, and they waited for the backlog's rows in memory
    (6 s, about 240 of a's requests, found by the review). The wake marks every open
    destination wanted."""
    config, spool = await backlogged(tmp_path, ("a", "b"), ("a",),
                                     delivery={"concurrency": 8, "per_host_concurrency": 8})
    transport = Slow()
    dispatcher = Dispatcher(config, spool, transport=transport)
    await dispatcher.start()
    try:
        await asyncio.sleep(0.5)
        await spool.ingest([item(i, "b") for i in range(5)])   # (as another worker would)
        stored = time.monotonic()
        dispatcher.others_stored()
        for _ in range(100):
            if sum("//b." in url for url, _ in transport.sent) == 5:
                break
            await asyncio.sleep(0.05)
        arrived = [at for url, at in transport.sent if "//b." in url]
        assert len(arrived) == 5
        # a's requests answered meanwhile: a few rounds of its 8 slots, not the ~250 rows of
        # the backlog it held in memory
        meanwhile = sum("//a." in url and stored < at <= max(arrived)
                        for url, at in transport.sent)
        assert meanwhile < 100, meanwhile
    finally:
        await dispatcher.stop(1)
        await spool.close()
