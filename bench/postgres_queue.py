"""The PostgreSQL spool as a queue: ingests and a dispatcher's claims and outcomes at once, on a
fresh database, with direct spool calls (no HTTP).

Concurrent senders ingest single events (3 pending deliveries each) while one dispatcher loop
claims due deliveries (``poll``, 200 at a time) and records each as delivered, until every
delivery is done. The tables grow from empty faster than autovacuum's ANALYZE describes them,
as on a new deployment or after a backlog: the plans PostgreSQL picks then are what this
measures. Prints events/s, the database server's CPU per 1,000 events (every PostgreSQL
process, from /proc), this process's, and the sequential scans of the spool's big tables
(from pg_stat_user_tables) with the rows they read.
Usage: python bench/postgres_queue.py [--events 20000] [--concurrency 64 4]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_seconds, machine, table

from relay.events import Event, accept
from relay.routing import Route
from relay.spool import Attempt
from relay.spool.postgres import PostgresSpool
from tests.pg import PgServer

ROUTES = (Route("a", "pending"), Route("b", "pending"), Route("c", "pending"))
BIG_TABLES = ("events", "deliveries", "sender_ids", "attempts")


async def run(server: PgServer, events: int, concurrency: int) -> list[object]:
    dsn = server.new_database()
    spool = PostgresSpool(dsn, max_events=10 * events)
    await spool.open()
    numbers = iter(range(events))
    delivered = 0

    async def sender() -> None:
        for i in numbers:
            ev = Event(id=f"e{i}", channel="email", status="sent", message_id=f"m{i}")
            await spool.ingest([(accept(ev, time.time()), ROUTES)])

    async def dispatcher() -> None:
        nonlocal delivered
        while delivered < events * len(ROUTES):
            batch = await spool.poll(time.time() + 1, 200, ["a", "b", "c"])
            if not batch.due:
                await asyncio.sleep(0.005)
                continue
            ok = Attempt(time.time(), 0.001, 200, None, None)
            await asyncio.gather(*(spool.record_attempt(due, ok, state="delivered",
                                                        not_before=None, failures=0,
                                                        reason=None)
                                   for due in batch.due))
            delivered += len(batch.due)

    pg = server.pid
    assert pg is not None
    db0, own0, start = cpu_seconds(pg), time.process_time(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(concurrency)), dispatcher()),
                           timeout=600)
    db1, own1, took = cpu_seconds(pg), time.process_time(), time.perf_counter() - start
    await spool.close()
    conn = await asyncpg.connect(dsn)
    try:
        await asyncio.sleep(1.2)  # backends report their table statistics when idle, within 1 s
        scans = await conn.fetch("SELECT relname, seq_scan, seq_tup_read FROM pg_stat_user_tables "
                                 "WHERE relname = ANY($1::text[]) AND seq_tup_read > 0 "
                                 "ORDER BY relname", list(BIG_TABLES))
    finally:
        await conn.close()
    seq = ", ".join(f"{name} {n:,} ({rows:,} rows)" for name, n, rows in scans) or "none"
    return [concurrency, events / took, (db1 - db0) * 1e6 / events, (own1 - own0) * 1e6 / events,
            spool.groups, seq]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000, help="events per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 4],
                        help="concurrent single-event senders, one run each")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="relay-bench-pgq-"))
    base.chmod(0o755)
    server = PgServer(base / "pgdata")
    try:
        rows = [uvloop.run(run(server, args.events, c)) for c in args.concurrency]
    finally:
        server.close()
    table(f"PostgreSQL spool as a queue: {args.events:,} events x {len(ROUTES)} deliveries, "
          f"ingested and delivered at once, on a fresh database; {machine()}",
          ["senders", "events/s", "db CPU us/event", "spool CPU us/event", "groups",
           "sequential scans of big tables"], rows)


if __name__ == "__main__":
    main()
