"""A dead receiver is suspended, its deliveries held (not failed), then drained on recovery,
while a healthy receiver keeps receiving throughout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from relay.config import load_config
from tests.helpers import async_eventually, event, write_config
from tests.receiver import Answer

pytestmark = pytest.mark.slow


async def test_dead_host_is_suspended_held_and_drained(
        tmp_path: Path, make_stack: Any, receivers: Any) -> None:
    """500 events: the 503 host is suspended after the threshold, gets far fewer than 500
    requests while down, then every delivery arrives exactly once with a 200; none failed."""
    bad, good = receivers(Answer(503)), receivers()
    config = load_config(write_config(
        tmp_path,
        delivery={"allowed_ports": [bad.port, good.port], "backoff_initial": "50ms",
                  "backoff_max": "200ms", "retry_window": "1m", "timeout": "2s"},
        health={"window": "10s", "min_failures": 5, "failure_rate": 0.9,
                "consecutive_failures": 5, "suspend_for": "300ms", "suspend_max": "1s"},
        destinations=[{"name": "bad", "format": "braze", "url": f"{bad.url}/braze"},
                      {"name": "good", "format": "braze", "url": f"{good.url}/braze"}]),
        env={})
    client = (await make_stack(config)).client
    ids: dict[str, set[str]] = {"bad": set(), "good": set()}
    for start in range(0, 500, 100):
        resp = await client.post("/v1/events", json=[event(i) for i in range(start, start + 100)])
        assert resp.status == 202
        for entry in (await resp.json())["events"]:
            for d in entry["deliveries"]:
                ids[d["destination"]].add(d["delivery_id"])

    async def bad_host() -> dict[str, Any]:
        hosts = (await (await client.get("/v1/hosts")).json())["hosts"]
        return next(h for h in hosts if h["destinations"] == ["bad"])

    suspended = await async_eventually(bad_host, lambda host: host["state"] == "suspended",
                                       what="the 503 host to be suspended", timeout=20,
                                       interval=0.05)
    assert suspended["queued"] > 400 and suspended["suspensions_in_a_row"] >= 1

    # The healthy receiver gets everything while the other host is down.
    await good.await_for(500, timeout=20)
    assert {r.headers["Webhook-Id"] for r in good.received()} == ids["good"]

    # Held deliveries show Braze's simulated 598 and are not failed.
    listing = await (await client.get("/v1/deliveries?destination=bad&limit=1000")).json()
    held = [d for d in listing["deliveries"] if "held" in d]
    assert held and held[0]["held"]["status_code"] == 598
    await async_eventually(bad_host, lambda host: host["suspensions_in_a_row"] >= 3,
                           what="the host to stay down through two failed probes",
                           timeout=20, interval=0.05)
    while_down = len(bad.received())
    print(f"requests to the suspended host while down: {while_down}")
    assert while_down < 60, f"{while_down} requests reached the suspended host"

    bad.set_default(Answer(200))                          # the receiver comes back
    await bad.await_for(while_down + 500, timeout=30)

    async def all_delivered() -> bool:
        resp = await client.get("/v1/deliveries?destination=bad&status=pending")
        return not (await resp.json())["deliveries"]

    await async_eventually(all_delivered, what="no pending delivery left for the bad host",
                           timeout=20, interval=0.05)
    ok = Counter(r.headers["Webhook-Id"] for r in bad.received() if r.status == 200)
    assert set(ok) == ids["bad"] and set(ok.values()) == {1}
    failed = await (await client.get("/v1/deliveries?status=failed")).json()
    assert failed["deliveries"] == []
    assert (await bad_host())["state"] == "healthy"


async def test_slow_host_does_not_hold_up_others(tmp_path: Path, make_stack: Any,
                                                 receivers: Any) -> None:
    """A host at its concurrency limit is passed over: the fast host's deliveries, queued
    behind the slow host's in the spool, still go out at once."""
    # The slow host answers long after the fast one could have had everything.
    slow, fast = receivers(Answer(200, delay=20.0)), receivers()
    config = load_config(write_config(
        tmp_path,
        delivery={"allowed_ports": [slow.port, fast.port], "per_host_concurrency": 2,
                  "concurrency": 8},
        destinations=[{"name": "slow", "format": "braze", "url": f"{slow.url}/b"},
                      {"name": "fast", "format": "braze", "url": f"{fast.url}/b"}]), env={})
    stack = await make_stack(config)
    # The slow host's deliveries are older: they come first in the spool.
    await stack.client.post("/v1/events", json=[event(i) for i in range(40)])
    await fast.await_for(40, timeout=10)
    # Had the fast host waited its turn it would still have nothing: the slow host has only
    # its two concurrent requests, both still unanswered.
    assert len(slow.received()) <= 2
    await stack.stop(0.1)
