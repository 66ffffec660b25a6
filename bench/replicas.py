"""Ingest and end-to-end rates for 1, 2 and 3 replicas on one PostgreSQL, in one run.

Each round gets a fresh database on one pgserver PostgreSQL (started here, unix socket), starts
N ``relay serve`` processes on it and posts batches of 100 (8 senders, spread round-robin over
the replicas) to one fast local receiver (bench/_receiver.py, a separate process). "accepted/s"
runs from the first POST to the last 202, "delivered/s" until the receiver counted every event;
"duplicates" are 2xx deliveries beyond one per event (the leases should make it 0 here).
Usage: python bench/replicas.py [--events 20000] [--replicas 1,2,3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import BENCH, PY, free_port, machine, process, relay, table
from e2e import _count, send_and_count

from tests.pg import PgServer


async def drive(ports: list[int], receiver_port: int, total: int, tag: str) -> dict[str, float]:
    batches = [[{"id": f"{tag}-{b}-{i}", "channel": "email", "status": "delivered",
                 "message_id": f"m-{b}-{i}"} for i in range(100)] for b in range(total // 100)]
    async with aiohttp.ClientSession() as session:
        base = await _count(session, receiver_port)
        queue: asyncio.Queue[tuple[int, list[dict[str, str]]]] = asyncio.Queue()
        for n, batch in enumerate(batches):
            queue.put_nowait((ports[n % len(ports)], batch))

        async def sender() -> None:
            while not queue.empty():
                port, batch = queue.get_nowait()
                async with session.post(f"http://127.0.0.1:{port}/v1/events",
                                        data=json.dumps(batch),
                                        headers={"Content-Type": "application/json"}) as resp:
                    assert resp.status == 202, await resp.text()

        accepted, done = await send_and_count(session, sender, receiver_port, base, total)
        await asyncio.sleep(1.0)  # late duplicates, if any
        extra = (await _count(session, receiver_port)) - base - total
    return {"events_s": total / done, "ingest_s": total / accepted, "seconds": done,
            "duplicates": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--replicas", default="1,2,3")
    args = parser.parse_args()
    total = args.events // 100 * 100
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        pg = PgServer(tmpdir / "pgdata")
        try:
            rport = free_port()
            with process([PY, str(BENCH / "_receiver.py"), str(rport)], rport,
                         tmpdir / "recv.log"):
                for n in (int(x) for x in args.replicas.split(",")):
                    config = {
                        "spool": {"backend": "postgres",
                                  "postgres": {"dsn": pg.new_database(), "pool_size": 10}},
                        "delivery": {"allowed_ports": [rport], "per_host_concurrency": 64,
                                     "allowed_networks": ["127.0.0.0/8"]},
                        "destinations": [{"name": "braze", "format": "braze",
                                          "url": f"http://127.0.0.1:{rport}/braze"}]}
                    with ExitStack() as stack:
                        ports = []
                        for i in range(n):
                            workdir = tmpdir / f"n{n}-r{i}"
                            workdir.mkdir()
                            ports.append(stack.enter_context(relay(config, workdir))[1])
                        asyncio.run(drive(ports, rport, 1000, f"warm{n}"))
                        r = asyncio.run(drive(ports, rport, total, f"r{n}-{time.time()}"))
                    rows.append((n, total, r["seconds"], r["events_s"], r["ingest_s"],
                                 r["duplicates"]))
        finally:
            pg.close()
    table(f"Replicas on one PostgreSQL: {total:,} events in batches of 100 (8 senders spread "
          f"over the replicas) to one fast local receiver; {machine()}",
          ["replicas", "events", "seconds", "delivered/s", "accepted/s", "duplicates"], rows)


if __name__ == "__main__":
    main()
