"""The dispatcher's send step is a swappable transport: classification and retries happen
outside it, so a scripted transport drives a real spool through retry and delivery."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.config import load_config
from relay.dispatch import Dispatcher
from relay.events import Event as LocalEvent
from relay.events import accept
from relay.request import Exchange, Request
from relay.routing import Router
from relay.spool import Spool
from tests.helpers import write_config


class ScriptedTransport:
    """Answers each request with the next scripted status; records what it was asked."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[Request] = []
        self.sent = asyncio.Event()

    async def handle_request(self, request: Request, timeout: float) -> Exchange:
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        if not self.statuses:
            self.sent.set()
        return Exchange(0.0, 0.001, status, {"Retry-After": "0"} if status == 503 else {}, "x")


async def test_a_swapped_transport_is_judged_by_the_policy_and_recorded(tmp_path: Path) -> None:
    """A 503 then a 200 from a scripted transport: two attempts with one Webhook-Id, the first
    recorded as retried, the delivery delivered; nothing touched the network."""
    config = load_config(write_config(tmp_path, destinations=[
        {"name": "b", "format": "braze", "url": "https://b.example.com/hook"}]), env={})
    spool = Spool(config.spool.path)
    await spool.open()
    transport = ScriptedTransport(503, 200)
    dispatcher = Dispatcher(config, spool, transport=transport)
    await dispatcher.start()
    try:
        accepted = accept(LocalEvent(id="e1", channel="email", status="delivered",
                                     message_id="m1"), 1000.0)
        (ingested,) = await spool.ingest([(accepted, Router(config).route(accepted))])
        ((_, delivery_id, _),) = ingested.deliveries
        dispatcher.wake()
        await asyncio.wait_for(transport.sent.wait(), 20)
        for _ in range(200):
            record = await spool.get_delivery(delivery_id)
            if record is not None and record.state == "delivered":
                break
            await asyncio.sleep(0.02)
        assert record is not None and record.state == "delivered" and record.attempts == 2
        attempts = (await spool.attempts_of([record.seq]))[record.seq]
        assert [a.status_code for a in attempts] == [503, 200]
        assert {r.headers["Webhook-Id"] for r in transport.requests} == {delivery_id}
        assert all(r.url == "https://b.example.com/hook" for r in transport.requests)
    finally:
        await dispatcher.stop(1)
        await spool.close()


class ErrorAfterFailure:
    """A 503, then an error that never reached the host (egress refused it)."""

    def __init__(self) -> None:
        self.calls = 0
        self.sent = asyncio.Event()

    async def handle_request(self, request: Request, timeout: float) -> Exchange:
        self.calls += 1
        if self.calls == 1:
            return Exchange(0.0, 0.001, 503, {}, "down")
        self.sent.set()
        return Exchange(0.0, 0.0, error="blocked", detail="refused by delivery.allowed_networks")


async def test_a_probe_that_never_reached_the_host_does_not_heal_it(tmp_path: Path) -> None:
    """At the end of a suspension the probe is refused before it leaves (egress rules, no
    OAuth2 token, a bad URL): that says nothing of the host, which is not marked healthy (it
    was); the probe is given up, and the next request probes."""
    config = load_config(write_config(
        tmp_path, health={"consecutive_failures": 1, "min_failures": 100,
                          "suspend_for": "100ms"},
        delivery={"backoff_initial": "10ms", "backoff_max": "10ms"},
        destinations=[{"name": "b", "format": "braze", "url": "https://b.example.com/hook"}]),
        env={})
    spool = Spool(config.spool.path)
    await spool.open()
    transport = ErrorAfterFailure()
    dispatcher = Dispatcher(config, spool, transport=transport)
    await dispatcher.start()
    try:
        accepted = accept(LocalEvent(id="e1", channel="email", status="delivered",
                                     message_id="m1"), 1000.0)
        await spool.ingest([(accepted, Router(config).route(accepted))])
        dispatcher.wake()
        await asyncio.wait_for(transport.sent.wait(), 20)   # the probe, refused
        await asyncio.sleep(0.05)
        (host,) = dispatcher.health.hosts.values()
        assert host.state != "healthy" and host.suspensions == 1
    finally:
        await dispatcher.stop(1)
        await spool.close()
