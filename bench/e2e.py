"""End to end: events/s from POST /v1/events to a fast local receiver, relay vs a minimal
non-durable forwarder and vs the floor (bench/_floor.py: the forwarder made durable, and
nothing more: it answers 202 once the events are committed to SQLite and records each outcome),
in the same run.

The load generator is this script's own aiohttp client (a separate process from both servers),
posting batches of 100 with 8 in flight. Time runs from the first POST until the receiver has
counted every event. Usage: python bench/e2e.py [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH,
    PY,
    backends_arg,
    cpu_seconds,
    floor_server,
    free_port,
    machine,
    process,
    relay,
    spools,
    table,
)


async def _count(session: aiohttp.ClientSession, port: int) -> int:
    async with session.get(f"http://127.0.0.1:{port}/count") as resp:
        return (await resp.json())["count"]


async def send_and_count(session: aiohttp.ClientSession, sender: Callable[[], Awaitable[None]],
                         receiver_port: int, base: int, total: int) -> tuple[float, float]:
    """Run 8 senders, then wait until the receiver has counted ``total`` more events; returns
    (seconds until every POST was answered, seconds until every event arrived)."""
    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(8)))
    accepted = time.perf_counter() - start
    deadline = start + 600
    while (await _count(session, receiver_port)) - base < total:
        if time.perf_counter() > deadline:
            raise RuntimeError("not every event arrived within 600 s")
        await asyncio.sleep(0.01)
    return accepted, time.perf_counter() - start


async def drive(ingest_port: int, receiver_port: int, total: int, tag: str) -> dict[str, float]:
    batches = [[{"id": f"{tag}-{b}-{i}", "channel": "email", "status": "delivered",
                 "message_id": f"m-{b}-{i}"} for i in range(100)] for b in range(total // 100)]
    async with aiohttp.ClientSession() as session:
        base = await _count(session, receiver_port)
        queue: asyncio.Queue[list[dict[str, str]]] = asyncio.Queue()
        for batch in batches:
            queue.put_nowait(batch)
        post_latencies: list[float] = []

        async def sender() -> None:
            while not queue.empty():
                batch = queue.get_nowait()
                t = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{ingest_port}/v1/events",
                                        data=json.dumps(batch),
                                        headers={"Content-Type": "application/json"}) as resp:
                    assert resp.status == 202, await resp.text()
                post_latencies.append(time.perf_counter() - t)

        accepted, done = await send_and_count(session, sender, receiver_port, base, total)
    post_latencies.sort()
    return {"events_s": total / done, "ingest_s": total / accepted, "seconds": done,
            "p50_post_ms": post_latencies[len(post_latencies) // 2] * 1000}


def timed(pid: int, run: Callable[[], Coroutine[Any, Any, dict[str, float]]],
          events: int) -> dict[str, float]:
    """One drive, with the CPU the server's processes spent per 1,000 events."""
    before = cpu_seconds(pid)
    result = asyncio.run(run())
    result["cpu_s_per_1k"] = (cpu_seconds(pid) - before) * 1000 / events
    return result


def run(events: int, backend: str, destination_extra: dict[str, Any] | None = None
        ) -> dict[str, dict[str, float]]:
    """The forwarder's figures and each backend's: name -> figures."""
    total = events // 100 * 100
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, spools(backend, Path(tmp)) as backends:
        tmpdir = Path(tmp)
        rport = free_port()
        with process([PY, str(BENCH / "_receiver.py"), str(rport)], rport, tmpdir / "recv.log"):
            fport = free_port()
            with process([PY, str(BENCH / "_forwarder.py"), str(fport),
                          f"http://127.0.0.1:{rport}/braze"], fport, tmpdir / "fwd.log") as fwd:
                asyncio.run(drive(fport, rport, 1000, "warm"))
                results["forwarder"] = timed(fwd.pid, lambda: drive(fport, rport, total, "fwd"),
                                             total)
            for name, spool in backends:
                config = {"spool": spool,
                          "delivery": {"allowed_ports": [rport], "per_host_concurrency": 64,
                                       "allowed_networks": ["127.0.0.0/8"]},
                          "destinations": [{"name": "braze", "format": "braze",
                                            "url": f"http://127.0.0.1:{rport}/braze",
                                            **(destination_extra or {})}]}
                with relay(config, tmpdir):
                    pass  # start once so the first run does not pay for creating the spool
                with relay(config, tmpdir) as (proc, port):
                    asyncio.run(drive(port, rport, 1000, f"warm{name}"))
                    tag = f"r{name}{time.time()}"
                    results[name] = timed(proc.pid, lambda t=tag: drive(port, rport, total, t),
                                          total)
            # Last, so the relay is measured after the same runs as before the floor existed.
            with floor_server(1, f"http://127.0.0.1:{rport}/braze") as (floor, lport):
                asyncio.run(drive(lport, rport, 1000, "warmfloor"))
                results["floor"] = timed(floor.pid, lambda: drive(lport, rport, total, "floor"),
                                         total)
    for figures in results.values():
        figures["events"] = total
    return results


def report(results: dict[str, dict[str, float]]) -> None:
    labels = {"forwarder": "minimal forwarder, not durable",
              "floor": "floor: lean durable relay (bench/_floor.py)",
              "sqlite": "relay: durable SQLite spool, braze shape",
              "postgres": "relay: durable PostgreSQL spool, braze shape"}
    rows = []
    total = int(results["forwarder"]["events"])
    for name in (n for n in ("forwarder", "floor", "sqlite", "postgres") if n in results):
        r = results[name]
        rows.append((labels[name], total, r["seconds"], r["events_s"], r["ingest_s"],
                     r["p50_post_ms"], f"{r['cpu_s_per_1k']:.3f}"))
    table(f"End to end, {total:,} events in batches of 100 (8 senders) to one fast local "
          f"receiver; load from this script's aiohttp client; {machine()}",
          ["server", "events", "seconds", "delivered/s", "accepted/s", "p50 POST ms",
           "CPU s/1k ev"], rows)
    print()
    floor, fwd = results.get("floor"), results["forwarder"]
    if floor is not None:
        print(f"floor/forwarder (what durability alone costs on this stack): delivered "
              f"events/s {floor['events_s'] / fwd['events_s']:.2f}, CPU per event "
              f"{floor['cpu_s_per_1k'] / fwd['cpu_s_per_1k']:.1f}x")
    for backend in (b for b in ("sqlite", "postgres") if b in results):
        ratio = results[backend]["events_s"] / results["forwarder"]["events_s"]
        cpu = results[backend]["cpu_s_per_1k"] / results["forwarder"]["cpu_s_per_1k"]
        print(f"relay ({backend})/forwarder delivered events/s: {ratio:.2f} (target >= 0.80); "
              f"CPU per event relay/forwarder {cpu:.1f}x")
    if "sqlite" in results and "postgres" in results:
        ratio = results["postgres"]["events_s"] / results["sqlite"]["events_s"]
        print(f"postgres/sqlite end to end: {ratio:.2f} (target >= 0.50)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--destination-extra", default="{}", metavar="JSON",
                        help="keys merged into the destination, e.g. a control to measure: "
                             "'{\"rate_limit\": {\"per_second\": 1000000}}'")
    backends_arg(parser)
    args = parser.parse_args()
    report(run(args.events, args.backend, json.loads(args.destination_extra)))


if __name__ == "__main__":
    main()
