"""Ingest-to-receiver latency at a fixed offered rate (issue 21: p99 <= 10 ms at 1,000 events/s),
relay vs the minimal non-durable forwarder, in the same run.

Open-loop load from this script's own process: single events (one JSON object per POST) are
posted on a fixed schedule, event i at t0 + i/rate, each at its time whatever earlier POSTs are
doing (a pool of up to 64 keep-alive connections; a POST waiting for a free connection is still
timed from its start). When the sender itself starts a POST later than scheduled, that lag is
counted and reported (``behind``, ``lag p99``), never absorbed by sending fewer events.

Latency per event is its arrival at the receiver (bench/_latency_receiver.py, keyed by the braze
``dispatch_id``, which is the event's ``message_id``) minus the time its POST started, both
``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock for all processes on a Linux machine.

Usage: python bench/latency.py [--rates 200,1000] [--seconds 10] [--backend sqlite|postgres|both]
Importable: ``run(rates, seconds, backend)`` returns the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BACKENDS, BENCH, PY, cpu_seconds, free_port, machine, process, relay, spools, table

TARGET_RATE = 1000
TARGET_P99_MS = 10.0
CONNECTIONS = 64  # keep-alive connections the sender may hold open
POST_TIMEOUT = 10.0  # seconds one POST may take before it counts as failed
LOST_AFTER = 30.0  # seconds after the last answer an event may still arrive before it is lost
BEHIND_NS = 2_000_000  # a POST started this much after its scheduled time counts as behind
WARMUP_SECONDS = 1.0

LABELS = {"forwarder": "minimal forwarder, not durable",
          "sqlite": "relay: durable SQLite spool, braze shape",
          "postgres": "relay: durable PostgreSQL spool, braze shape"}


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when there are none)."""
    if not values:
        return math.nan
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


class Receiver:
    """Control calls to bench/_latency_receiver.py."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session, self.base = session, f"http://127.0.0.1:{port}"

    async def reset(self) -> None:
        async with self.session.post(f"{self.base}/reset") as resp:
            resp.raise_for_status()

    async def count(self) -> int:
        async with self.session.get(f"{self.base}/count") as resp:
            return int((await resp.json())["count"])

    async def arrivals(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/arrivals") as resp:
            return dict(await resp.json())

    async def wait_for(self, expected: int, timeout: float) -> None:
        """Poll until ``expected`` distinct events have arrived, or ``timeout`` seconds passed."""
        deadline = time.monotonic() + timeout
        for _ in range(math.ceil(timeout / 0.02) + 1):
            if await self.count() >= expected or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.02)


async def offer(session: aiohttp.ClientSession, url: str, rate: float, seconds: float,
                tag: str) -> dict[str, Any]:
    """Post ``rate * seconds`` single events on schedule; returns per-event start times, POST
    answer latencies and failures."""
    total = max(1, round(rate * seconds))
    ids = [f"{tag}-{i}" for i in range(total)]
    bodies = [json.dumps({"id": key, "channel": "email", "status": "delivered",
                          "message_id": key}).encode() for key in ids]
    headers = {"Content-Type": "application/json"}
    period = 1e9 / rate
    started: dict[str, int] = {}
    lags: list[int] = []
    answers: list[int] = []
    accepted: list[str] = []
    failures: list[str] = []
    inflight = {"now": 0, "peak": 0}

    async def post(i: int, due: int) -> None:
        start = time.monotonic_ns()
        lags.append(start - due)
        started[ids[i]] = start
        inflight["now"] += 1
        inflight["peak"] = max(inflight["peak"], inflight["now"])
        try:
            async with session.post(url, data=bodies[i], headers=headers) as resp:
                await resp.read()
                if resp.status != 202:
                    failures.append(f"HTTP {resp.status}")
                    return
            answers.append(time.monotonic_ns() - start)
            accepted.append(ids[i])
        except (aiohttp.ClientError, TimeoutError) as exc:
            failures.append(type(exc).__name__)
        finally:
            inflight["now"] -= 1

    tasks: list[asyncio.Task[None]] = []
    t0 = time.monotonic_ns() + 20_000_000
    i = 0
    while i < total:
        now = time.monotonic_ns()
        while i < total and t0 + int(i * period) <= now:
            tasks.append(asyncio.create_task(post(i, t0 + int(i * period))))
            i += 1
        if i < total:
            await asyncio.sleep(max(0, t0 + int(i * period) - time.monotonic_ns()) / 1e9)
    await asyncio.wait_for(asyncio.gather(*tasks), POST_TIMEOUT + 5)
    first, last = min(started.values()), max(started.values())
    return {"total": total, "started": started, "lags": sorted(lags), "answers": sorted(answers),
            "failures": failures, "peak_inflight": inflight["peak"],
            "accepted": accepted,
            "achieved": (total - 1) / ((last - first) / 1e9) if total > 1 and last > first else rate}


async def window(session: aiohttp.ClientSession, receiver: Receiver, ingest_port: int, pid: int,
                 rate: float, seconds: float, tag: str) -> dict[str, Any]:
    """One measured window at one rate: offer, wait for the deliveries, compute the figures."""
    await receiver.reset()
    cpu_before = cpu_seconds(pid)
    sent = await offer(session, f"http://127.0.0.1:{ingest_port}/v1/events", rate, seconds, tag)
    await receiver.wait_for(len(sent["accepted"]), LOST_AFTER)
    cpu = cpu_seconds(pid) - cpu_before
    got = await receiver.arrivals()
    arrivals: dict[str, int] = got["arrivals"]
    latencies = sorted(arrivals[key] - start for key, start in sent["started"].items()
                       if key in arrivals)
    ms = 1e-6
    return {
        "rate_offered": rate,
        "rate_achieved": sent["achieved"],
        "events": sent["total"],
        "failed_posts": len(sent["failures"]),
        "failures": sorted(set(sent["failures"])),
        "lost": sum(1 for key in sent["accepted"] if key not in arrivals),
        "duplicates": got["duplicates"],
        "behind": sum(1 for lag in sent["lags"] if lag > BEHIND_NS),
        "lag_p99_ms": percentile(sent["lags"], 99) * ms,
        "lag_max_ms": percentile(sent["lags"], 100) * ms,
        "peak_inflight": sent["peak_inflight"],
        "post_p50_ms": percentile(sent["answers"], 50) * ms,
        "post_p99_ms": percentile(sent["answers"], 99) * ms,
        "e2e_p50_ms": percentile(latencies, 50) * ms,
        "e2e_p99_ms": percentile(latencies, 99) * ms,
        "e2e_max_ms": percentile(latencies, 100) * ms,
        "cpu_s_per_1k": cpu * 1000 / sent["total"],
    }


async def measure(name: str, ingest_port: int, receiver_port: int, pid: int,
                  rates: Sequence[float], seconds: float, warmup: float) -> dict[float, dict[str, Any]]:
    """Warm the server up (not counted), then one window per rate, on the same connections."""
    nonce = time.time_ns()
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
            aiohttp.ClientSession(timeout=timeout) as control:
        receiver = Receiver(control, receiver_port)
        if warmup > 0:
            await window(session, receiver, ingest_port, pid, min(rates), warmup,
                         f"{name}-{nonce}-warm")
        return {rate: await window(session, receiver, ingest_port, pid, rate, seconds,
                                   f"{name}-{nonce}-{rate:g}")
                for rate in rates}


def _measure(name: str, ingest_port: int, receiver_port: int, pid: int, rates: Sequence[float],
             seconds: float, warmup: float) -> dict[float, dict[str, Any]]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(measure(name, ingest_port, receiver_port, pid, rates, seconds, warmup))


def run(rates: Sequence[float] = (200, 1000), seconds: float = 10.0, backend: str = "sqlite",
        warmup: float = WARMUP_SECONDS) -> dict[str, dict[float, dict[str, Any]]]:
    """Measure the forwarder and the relay on each backend asked for ("sqlite", "postgres" or
    "both"); returns {server: {rate: figures}} with server in "forwarder", "sqlite", "postgres"."""
    results: dict[str, dict[float, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, spools(backend, Path(tmp)) as backends:
        tmpdir = Path(tmp)
        rport = free_port()
        with process([PY, str(BENCH / "_latency_receiver.py"), str(rport)], rport,
                     tmpdir / "recv.log"):
            fport = free_port()
            with process([PY, str(BENCH / "_forwarder.py"), str(fport),
                          f"http://127.0.0.1:{rport}/braze"], fport, tmpdir / "fwd.log") as fwd:
                results["forwarder"] = _measure("fwd", fport, rport, fwd.pid, rates, seconds, warmup)
            for name, spool in backends:
                config = {"spool": spool,
                          "delivery": {"allowed_ports": [rport], "per_host_concurrency": 64,
                                       "allowed_networks": ["127.0.0.0/8"]},
                          "destinations": [{"name": "braze", "format": "braze",
                                            "url": f"http://127.0.0.1:{rport}/braze"}]}
                with relay(config, tmpdir):
                    pass  # start once so the measured run does not pay for creating the spool
                with relay(config, tmpdir) as (proc, port):
                    results[name] = _measure(name, port, rport, proc.pid, rates, seconds, warmup)
    return results


def verdict(results: dict[str, dict[float, dict[str, Any]]], backend: str) -> str:
    figures = results.get(backend, {}).get(TARGET_RATE)
    if figures is None:
        return f"relay ({backend}) ingest-to-receiver p99 at 1,000 events/s: not measured"
    p99, lost = figures["e2e_p99_ms"], figures["lost"] + figures["failed_posts"]
    met = p99 <= TARGET_P99_MS and lost == 0
    return (f"relay ({backend}) ingest-to-receiver p99 at 1,000 events/s: {p99:.2f} ms "
            f"(target <= {TARGET_P99_MS:g} ms): {'met' if met else 'not met'}"
            + (f" ({lost} events failed or lost)" if lost else ""))


def report(results: dict[str, dict[float, dict[str, Any]]], seconds: float) -> None:
    headers = ["offered/s", "achieved/s", "events", "failed", "lost", "behind", "lag p99 ms",
               "peak in flight", "POST p50 ms", "POST p99 ms", "e2e p50 ms", "e2e p99 ms",
               "e2e max ms", "CPU s/1k ev"]
    for name, by_rate in results.items():
        rows = [(f"{r['rate_offered']:g}", r["rate_achieved"], r["events"], r["failed_posts"],
                 r["lost"], r["behind"], r["lag_p99_ms"], r["peak_inflight"], r["post_p50_ms"],
                 r["post_p99_ms"], r["e2e_p50_ms"], r["e2e_p99_ms"], r["e2e_max_ms"],
                 r["cpu_s_per_1k"]) for r in by_rate.values()]
        table(f"{LABELS[name]}: single events, open loop, {seconds:g} s per rate", headers, rows)
        for r in by_rate.values():
            if r["failures"]:
                print(f"  at {r['rate_offered']:g}/s failed POSTs: {', '.join(r['failures'])}")
    print(f"\n{machine()}. e2e = arrival at the receiver - POST start (CLOCK_MONOTONIC); "
          f"behind = POSTs started > {BEHIND_NS / 1e6:g} ms after schedule (lag: the sender's "
          f"own jitter); CPU = the server's processes only (not PostgreSQL, not the receiver).\n")
    for backend in (b for b in BACKENDS if b in results):
        print(verdict(results, backend))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="200,1000",
                        help="offered rates in events/s, comma-separated (default: 200,1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate (default: 10)")
    parser.add_argument("--warmup", type=float, default=WARMUP_SECONDS,
                        help="seconds at the lowest rate before measuring, not counted (default: 1)")
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="sqlite",
                        help="relay spool backend(s) to measure (default: sqlite)")
    args = parser.parse_args()
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates: expected comma-separated numbers, got {args.rates!r}")
    if not rates or min(rates) <= 0:
        parser.error("--rates: every rate must be > 0")
    if args.seconds <= 0:
        parser.error("--seconds: must be > 0")
    report(run(rates, args.seconds, args.backend, args.warmup), args.seconds)


if __name__ == "__main__":
    main()
