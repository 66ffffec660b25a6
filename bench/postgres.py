"""Durable ingest rate of the two spool backends side by side, with direct spool calls.

Concurrent ``ingest_receipt`` calls (like concurrent HTTP requests: each resolves after its
group's COMMIT), single events and batches of 100, on a fresh SQLite file and on a fresh
PostgreSQL database (pgserver, started here, on a unix socket). No HTTP: this measures what the
spool itself sustains. Issue 16's targets: single-event PostgreSQL >= 50 % of SQLite; batches
of 100 >= 20,000 events/s.
Usage: python bench/postgres.py [--seconds 5] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.events import Event, accept
from relay.routing import Route
from relay.spool import Spool
from relay.spool.postgres import PostgresSpool
from tests.pg import PgServer

ROUTES = (Route("ajo", "pending"), Route("braze", "pending"), Route("crm", "skipped", "status"))


def batch(prefix: str, n: int, size: int) -> list[tuple[object, tuple[Route, ...]]]:
    now = time.time()
    return [(accept(Event(id=f"{prefix}-{n}-{i}", channel="email", status="sent",
                          message_id=f"m{i}"), now), ROUTES) for i in range(size)]


async def rate(spool: Spool | PostgresSpool, size: int, concurrency: int, seconds: float,
               tag: str) -> float:
    """Events stored per second by ``concurrency`` clients, each ingesting ``size`` at a time."""
    stored = 0
    # Built before the clock starts (validation is the server's cost, not the spool's): enough
    # unique events for 40,000 events/s.
    ready = [batch(tag, n, size) for n in range(int(40_000 * seconds / size) + concurrency)]
    deadline = time.perf_counter() + seconds

    async def client(c: int) -> None:
        nonlocal stored
        while time.perf_counter() < deadline and ready:
            receipt = await spool.ingest_receipt(ready.pop())  # type: ignore[arg-type]
            stored += receipt.stored
    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return stored / (time.perf_counter() - started)


async def measure(spool: Spool | PostgresSpool, args: argparse.Namespace) -> dict[str, float]:
    await spool.open()
    try:
        await rate(spool, 1, 8, 1.0, "warm")
        return {"single": await rate(spool, 1, args.concurrency, args.seconds, "s"),
                "batch of 100": await rate(spool, 100, max(1, args.concurrency // 4),
                                           args.seconds, "b")}
    finally:
        await spool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent single-event clients")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = asyncio.run(measure(Spool(Path(tmp) / "spool.db", max_events=10**9), args))
        server = PgServer(Path(tmp) / "pgdata")
        try:
            pg = asyncio.run(measure(PostgresSpool(server.new_database(), max_events=10**9), args))
        finally:
            server.close()
    print(f"{'mode':<14}{'sqlite ev/s':>14}{'postgres ev/s':>16}{'pg/sqlite':>11}  target")
    for mode, target in (("single", ">= 50 % of sqlite"), ("batch of 100", ">= 20,000 ev/s")):
        print(f"{mode:<14}{sqlite[mode]:>14,.0f}{pg[mode]:>16,.0f}{pg[mode] / sqlite[mode]:>10.0%}"
              f"  {target}")


if __name__ == "__main__":
    main()
