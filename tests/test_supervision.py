"""Supervised tasks restart after a failure, and an attempt whose outcome cannot be recorded
is kept and recorded later, never sent again because of it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from relay.config import load_config
from relay.dispatch import Dispatcher
from relay.errors import SpoolError
from relay.events import Event, accept
from relay.metrics import Metrics
from relay.routing import Router
from relay.server import create_app
from relay.spool import Spool
from relay.supervise import RESTART_FIRST, RESTART_MAX, Supervisor
from tests.helpers import write_config
from tests.receiver import Answer, Receiver, receiver_config


class Sleeps:
    """An injected sleep that records how long it was asked to wait, and returns at once."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await asyncio.sleep(0)


async def test_a_failing_task_is_restarted_with_growing_backoff() -> None:
    """Each failure is counted and followed by a longer wait (doubling up to the cap); a task
    that returns is finished and not restarted."""
    sleeps, restarted, runs = Sleeps(), [], []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 9:
            raise RuntimeError(f"boom {len(runs)}")

    supervisor = Supervisor(restarted.append, sleep=sleeps, clock=lambda: 0.0)
    await supervisor.spawn("flaky", flaky)
    assert len(runs) == 9 and restarted == ["flaky"] * 8 and supervisor.restarts == {"flaky": 8}
    assert sleeps.asked == [min(RESTART_FIRST * 2 ** i, RESTART_MAX) for i in range(8)]
    assert supervisor.down == {}


async def test_a_task_is_down_between_its_failure_and_its_restart() -> None:
    """While a failed task waits for its restart, ``down`` names it with the error."""
    gate = asyncio.Event()

    async def wait(seconds: float) -> None:
        await gate.wait()

    async def fails_once(state: list[int] = []) -> None:  # noqa: B006 - counts runs
        state.append(1)
        if len(state) == 1:
            raise ValueError("bad row")

    supervisor = Supervisor(sleep=wait)
    task = supervisor.spawn("dispatcher", fails_once)
    for _ in range(100):
        if supervisor.down:
            break
        await asyncio.sleep(0)
    assert supervisor.down == {"dispatcher": "ValueError: bad row"}
    gate.set()
    await task
    assert supervisor.down == {}


class FlakySpool:
    """The real spool, with reads or outcome writes that fail on demand."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.fail_due: BaseException | None = None
        self.fail_records = False
        self.record_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spool, name)

    async def poll(self, *args: Any, **kwargs: Any) -> Any:   # the dispatcher's read of due work
        if self.fail_due is not None:
            exc, self.fail_due = self.fail_due, None
            raise exc
        return await self.spool.poll(*args, **kwargs)

    async def record_attempt(self, *args: Any, **kwargs: Any) -> None:
        self.record_calls += 1
        if self.fail_records:
            raise SpoolError("the disk holding the spool is full")
        await self.spool.record_attempt(*args, **kwargs)


async def _stack(tmp_path: Path, receiver: Receiver, aiohttp_client: Any):
    config = load_config(write_config(tmp_path, **receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}])), env={})
    spool = Spool(config.spool.path)
    await spool.open()
    flaky = FlakySpool(spool)
    metrics = Metrics()
    dispatcher = Dispatcher(config, flaky, metrics=metrics)  # type: ignore[arg-type]
    client = await aiohttp_client(create_app(config, spool, dispatcher, metrics))
    return config, spool, flaky, dispatcher, client, metrics


async def _ingest(config: Any, spool: Spool, n: int) -> list[str]:
    batch = [accept(Event(id=f"e{i}", channel="email", status="delivered", message_id=f"m{i}"),
                    1000.0) for i in range(n)]
    ingested = await spool.ingest([(a, Router(config).route(a)) for a in batch])
    return [d[1] for entry in ingested for d in entry.deliveries]


async def _until(predicate: Any, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_the_dispatcher_restarts_after_an_unexpected_error(tmp_path: Path,
                                                                 aiohttp_client: Any) -> None:
    """A bug in the dispatch loop is logged, counted in relay_task_restarts_total and the
    loop runs again: deliveries still go out."""
    with Receiver() as receiver:
        config, spool, flaky, dispatcher, client, _ = await _stack(tmp_path, receiver,
                                                                    aiohttp_client)
        flaky.fail_due = MemoryError("a due batch too large")
        await dispatcher.start()
        try:
            await _ingest(config, spool, 3)
            dispatcher.wake()
            await receiver.await_for(3)
            text = await (await client.get("/metrics")).text()
            assert 'relay_task_restarts_total{task="dispatcher"} 1.0' in text
        finally:
            await dispatcher.stop(1)
            await spool.close()


async def test_an_unrecordable_outcome_is_kept_not_sent_again(tmp_path: Path,
                                                              aiohttp_client: Any) -> None:
    """With the spool refusing writes, each delivery is sent once; its outcome is kept,
    dispatching pauses and /readyz says so; when the spool takes writes again the outcomes are
    recorded and nothing was sent twice."""
    with Receiver(Answer(200)) as receiver:
        config, spool, flaky, dispatcher, client, _ = await _stack(tmp_path, receiver,
                                                                    aiohttp_client)
        await dispatcher.start()
        try:
            flaky.fail_records = True
            ids = await _ingest(config, spool, 5)
            dispatcher.wake()
            await receiver.await_for(1)
            await _until(lambda: flaky.record_calls >= 6)   # several tries to record
            ready = await client.get("/readyz")
            assert ready.status == 503 and "paused" in (await ready.json())["error"]
            sent_while_broken = len(receiver.received())
            assert sent_while_broken <= 5 and sent_while_broken == len(
                {r.headers["Webhook-Id"] for r in receiver.received()})
            flaky.fail_records = False
            dispatcher.wake()
            await _until(lambda: len(receiver.received()) == 5)
            for delivery_id in ids:
                async def delivered(did: str = delivery_id) -> bool:
                    record = await spool.get_delivery(did)
                    return record is not None and record.state == "delivered"
                for _ in range(500):
                    if await delivered():
                        break
                    await asyncio.sleep(0.02)
                assert await delivered()
            webhook_ids = [r.headers["Webhook-Id"] for r in receiver.received()]
            assert sorted(webhook_ids) == sorted(ids)   # each sent exactly once
            assert (await client.get("/readyz")).status == 200
        finally:
            await dispatcher.stop(1)
            await spool.close()
