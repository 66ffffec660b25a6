"""The SQLite writer's CPU per event, in one process with no network: the relay's
``Writer.run_group`` against the floor's store (bench/_floor.py) on the same groups, and what
each of the relay's indexes and its dedupe lookup costs (the writer run on a schema without it).

Groups of 16 single events with 3 pending deliveries each, as wrk's 64 connections make them;
WAL, fsync per group (synchronous=FULL) as in the relay. CPU is this process's user + system
time (``time.process_time``) per event, so the figures need no quiet machine to compare: each
variant runs ``--rounds`` times, interleaved, and the median is printed.
Usage: python bench/writer.py [--groups 1500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _floor
from _common import machine, table

import relay.spool.sqlite_schema as sqlite_schema
from relay.spool.commit import Writer

GROUP = 16
ROUTES = [("ajo", "pending", None), ("braze", "pending", None), ("crm", "pending", None)]
BODY = json.dumps({"id": "e" * 36, "channel": "email", "status": "delivered",
                   "message_id": "m-0123456789", "recipient": {"email": "user@example.com"},
                   "attributes": {"order_id": "42"}, "occurred_at": "2026-12-04T13:00:00.000Z",
                   "received_at": "2026-12-04T13:00:00.000Z"})

# variant -> (schema text removed, replacement): the writer on a schema without that piece
WITHOUT = {
    "relay without the delivery_id UNIQUE index":
        ("delivery_id TEXT NOT NULL UNIQUE,", "delivery_id TEXT NOT NULL,"),
    "relay without the events-by-time index":
        ("CREATE INDEX events_by_time ON events(received_at);", ""),
}


def _jobs(group: int, sender_id: int) -> list[tuple[int, str, Any]]:
    now = time.time()
    return [(group * GROUP + j, "ingest", (now, now - 86_400, [
        (f"ev-{group}-{j}-{now}", sender_id, now, BODY, ROUTES)])) for j in range(GROUP)]


def _relay(path: str, schema: str, sender_id: int) -> Callable[[int], Any]:
    original = sqlite_schema.SCHEMA
    sqlite_schema.SCHEMA = schema
    try:
        conn = sqlite_schema.connect(path)
        sqlite_schema.migrate(conn)
    finally:
        sqlite_schema.SCHEMA = original
    writer = Writer(conn, 100_000_000, 0)
    return lambda group: writer.run_group(_jobs(group, sender_id))


def _floor_store(path: str) -> Callable[[int], Any]:
    store = _floor.Store(path, len(ROUTES))
    return lambda group: store.commit([(i, "ingest", [(ev[0], ev[3]) for ev in args[2]])
                                       for i, _, args in _jobs(group, 1)])


def variants() -> dict[str, Callable[[str], Callable[[int], Any]]]:
    schema = sqlite_schema.SCHEMA
    found: dict[str, Callable[[str], Callable[[int], Any]]] = {
        "relay (as shipped)": lambda path: _relay(path, schema, 1),
        "relay, events without a sender id (no dedupe lookup)": lambda path: _relay(path, schema, 0),
    }
    for name, (piece, replacement) in WITHOUT.items():
        if piece not in schema:  # the schema changed: say so rather than measure nothing
            raise SystemExit(f"bench/writer.py: {piece!r} is no longer in the spool schema")
        found[name] = functools.partial(_relay, schema=schema.replace(piece, replacement),
                                        sender_id=1)
    found["floor (bench/_floor.py's store)"] = _floor_store
    return found


def measure(make: Callable[[str], Callable[[int], Any]], groups: int) -> float:
    """CPU microseconds per event over ``groups`` groups, after 100 groups of warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        run = make(str(Path(tmp) / "spool.db"))
        for group in range(100):
            run(group)
        start = time.process_time()
        for group in range(100, 100 + groups):
            run(group)
        return (time.process_time() - start) / (groups * GROUP) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    found = variants()
    runs: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(args.rounds):
        for name, make in found.items():
            runs[name].append(measure(make, args.groups))
    shipped = statistics.median(runs["relay (as shipped)"])
    rows = [(name, f"{statistics.median(us):.1f}", f"{statistics.median(us) - shipped:+.1f}",
             ", ".join(f"{u:.1f}" for u in us)) for name, us in runs.items()]
    table(f"SQLite writer, in process: {args.groups} groups of {GROUP} single events x "
          f"{len(ROUTES)} deliveries, fsync per group; median of {args.rounds}; {machine()}",
          ["writer", "CPU us per event", "vs shipped", "each round"], rows)


if __name__ == "__main__":
    main()
