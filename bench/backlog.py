"""A dead receiver's backlog and the looks for everything else: what one look costs.

The dispatcher leaves a suspended host's destinations (and those at their concurrency or rate
limit) out of its looks. This fills a spool with ``--backlog`` due deliveries of one
destination ("dead") and 300 of another ("live"), then times, with direct spool calls on each
backend (no HTTP):

* a look for the live destination alone (``poll``, 256 rows, as the dispatcher asks while the
  dead host is suspended), and one for both (as it asks while the host is up);
* the next-due read for the live destination (``next_due_at``), and ``oldest_due`` (the
  ``relay_spool_oldest_due_age_seconds`` gauge, read per scrape);
* with no backlog, the same reads, for comparison;
* then ``--many`` destinations with 300 due deliveries each: a look for all of them against a
  look for one (each destination gives a share of the look, not the whole look).

PostgreSQL's looks claim what they find; the leases are cleared between reads (not timed).
Prints the median of ``--rounds`` rounds, in ms. PostgreSQL comes from pgserver (tests/pg.py).
Usage: python bench/backlog.py [--backlog 60000] [--rounds 30] [--backend sqlite postgres]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, table

from relay.events import Event, accept
from relay.routing import Route
from relay.spool import Spool
from relay.spool.postgres import PostgresSpool
from tests.pg import PgServer

LIVE = 300
LIMIT = 256


def item(i: int, destination: str) -> tuple[Any, tuple[Route, ...]]:
    ev = Event(id=f"{destination}{i}", channel="email", status="sent", message_id=f"m{i}")
    return accept(ev, time.time()), (Route(destination, "pending"),)


async def timed(rounds: int, read: Callable[[], Awaitable[Any]],
                after: Callable[[], Awaitable[Any]] | None = None) -> float:
    """The median ms of ``read`` over ``rounds`` (``after`` runs between rounds, not timed)."""
    took = []
    for _ in range(rounds):
        start = time.perf_counter()
        await read()
        took.append((time.perf_counter() - start) * 1000)
        if after is not None:
            await after()
    return statistics.median(took)


async def measure(spool: Any, backlog: int, rounds: int,
                  release: Callable[[], Awaitable[Any]] | None) -> list[Any]:
    for start in range(0, backlog, 2_000):
        await spool.ingest([item(i, "dead") for i in range(start, min(backlog, start + 2_000))])
    await spool.ingest([item(i, "live") for i in range(LIVE)])
    now = time.time() + 1
    batch = await spool.poll(now, LIMIT, ["live"])
    assert {d.destination for d in batch.due} == {"live"} and len(batch.due) == LIMIT
    if release is not None:
        await release()
    return [
        await timed(rounds, lambda: spool.poll(now, LIMIT, ["live"]), release),
        await timed(rounds, lambda: spool.poll(now, LIMIT, ["live", "dead"]), release),
        await timed(rounds, lambda: spool.next_due_at(["live"])),
        await timed(rounds, lambda: spool.oldest_due(now)),
    ]


async def measure_many(spool: Any, many: int, rounds: int,
                       release: Callable[[], Awaitable[Any]] | None) -> list[Any]:
    names = [f"d{n}" for n in range(many)]
    for start in range(0, 300, 20):
        await spool.ingest([
            (accept(Event(id=f"s{i}", channel="email", status="sent", message_id=f"s{i}"),
                    time.time()), tuple(Route(name, "pending") for name in names))
            for i in range(start, start + 20)])
    now = time.time() + 1
    return [
        await timed(rounds, lambda: spool.poll(now, LIMIT, names[:1]), release),
        await timed(rounds, lambda: spool.poll(now, LIMIT, names), release),
    ]


async def one_round(backend: str, base: Path, server: PgServer | None, backlog: int,
                    rounds: int, many: int = 0) -> list[Any]:
    """A fresh spool of ``backend``, filled and timed by ``measure`` (or ``measure_many``
    when ``many``). PostgreSQL's looks claim what they find: the leases are cleared between
    rounds."""
    spool: Any
    release = None
    if backend == "sqlite":
        spool = Spool(base / f"spool-{backlog}-{many}.db", max_events=10_000_000)
    else:
        assert server is not None
        spool = PostgresSpool(server.new_database(), max_events=10_000_000)

        async def release() -> None:
            async with spool._connection() as conn:
                await conn.execute("UPDATE deliveries SET lease_owner = NULL, "
                                   "lease_until = NULL WHERE lease_owner IS NOT NULL")

    await spool.open()
    try:
        if many:
            return await measure_many(spool, many, rounds, release)
        return await measure(spool, backlog, rounds, release)
    finally:
        await spool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backlog", type=int, default=60_000,
                        help="due deliveries of the dead destination")
    parser.add_argument("--rounds", type=int, default=30, help="reads timed per figure")
    parser.add_argument("--many", type=int, default=100,
                        help="destinations with a backlog each, for the last table")
    parser.add_argument("--backend", nargs="+", choices=["sqlite", "postgres"],
                        default=["sqlite", "postgres"])
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="relay-bench-backlog-"))
    base.chmod(0o755)
    rows, many_rows = [], []
    server = PgServer(base / "pgdata") if "postgres" in args.backend else None
    try:
        for backend in args.backend:
            for backlog in (0, args.backlog):
                print(f"{backend}: {backlog:,} due deliveries of the dead destination ...",
                      file=sys.stderr, flush=True)
                figures = uvloop.run(one_round(backend, base, server, backlog, args.rounds))
                rows.append([backend, f"{backlog:,}", *figures])
            print(f"{backend}: {args.many} destinations with a backlog ...", file=sys.stderr,
                  flush=True)
            figures = uvloop.run(one_round(backend, base, server, 0, args.rounds, args.many))
            many_rows.append([backend, *figures, figures[1] / figures[0]])
    finally:
        if server is not None:
            server.close()
    table(f"One look with a dead destination's backlog due (median of {args.rounds}, ms; "
          f"{LIMIT} rows a look, {LIVE} live deliveries); {machine()}",
          ["spool", "dead backlog", "look: live only", "look: live + dead",
           "next due: live", "oldest due"], rows)
    table(f"One look of {LIMIT} with {args.many} destinations, 300 due deliveries each "
          f"(median of {args.rounds}, ms)",
          ["spool", "look: one destination", f"look: all {args.many}", "ratio"], many_rows)


if __name__ == "__main__":
    main()
