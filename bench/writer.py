"""The SQLite writer's CPU per event, in one process with no network: the relay's
``Writer.run_group`` against the floor's store (bench/_floor.py) on the same groups, and what
the dedupe lookup and the two indexes schema 2 had cost (the writer run on events without a
sender id, or on a schema with the index added back).

Groups of 16 single events with 3 pending deliveries each, as wrk's 64 connections make them;
WAL, fsync per group (synchronous=FULL) as in the relay. CPU is this process's user + system
time per event, apart (``os.times``), and the bytes written per event (``/proc/self/io``), which
machine noise does not move at all; each variant runs ``--rounds`` times, interleaved, and the
medians are printed.
Usage: python bench/writer.py [--groups 1500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
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

# variant -> (schema text replaced, replacement): the writer on a schema with or without a piece
WITHOUT = {
    "relay with a delivery_id UNIQUE index (as schema 2 had)":
        ("delivery_id TEXT NOT NULL,", "delivery_id TEXT NOT NULL UNIQUE,"),
    "relay with an events-by-time index (as schema 2 had)":
        ("CREATE INDEX events_by_sender_id ON events(id) WHERE sender_id = 1;",
         "CREATE INDEX events_by_sender_id ON events(id) WHERE sender_id = 1;"
         "CREATE INDEX events_by_time ON events(received_at);"),
}


def _jobs(group: int, sender_id: int, uuids: bool = False) -> list[tuple[int, str, Any]]:
    """A group's ingest jobs. The sender ids grow in order unless ``uuids`` (random, as most
    senders' are): the dedupe index then takes each one on a page of its own."""
    now = time.time()
    return [(group * GROUP + j, "ingest", (now, now - 86_400, [
        (str(uuid.uuid4()) if uuids else f"ev-{group}-{j}-{now}", sender_id, now, BODY, ROUTES)]))
        for j in range(GROUP)]


def _relay(path: str, schema: str, sender_id: int, uuids: bool = False) -> Callable[[int], Any]:
    original = sqlite_schema.SCHEMA
    sqlite_schema.SCHEMA = schema
    try:
        conn = sqlite_schema.connect(path)
        sqlite_schema.migrate(conn)
    finally:
        sqlite_schema.SCHEMA = original
    writer = Writer(conn, 100_000_000, 0)
    return lambda group: writer.run_group(_jobs(group, sender_id, uuids))


def _floor_store(path: str) -> Callable[[int], Any]:
    store = _floor.Store(path, len(ROUTES))
    return lambda group: store.commit([(i, "ingest", [(ev[0], ev[3]) for ev in args[2]])
                                       for i, _, args in _jobs(group, 1)])


def variants() -> dict[str, Callable[[str], Callable[[int], Any]]]:
    schema = sqlite_schema.SCHEMA
    found: dict[str, Callable[[str], Callable[[int], Any]]] = {
        "relay (as shipped)": lambda path: _relay(path, schema, 1),
        "relay, senders' ids random (UUIDs)": lambda path: _relay(path, schema, 1, uuids=True),
        "relay, events without a sender id (no dedupe lookup)": lambda path: _relay(path, schema, 0),
    }
    for name, (piece, replacement) in WITHOUT.items():
        if piece not in schema:  # the schema changed: say so rather than measure nothing
            raise SystemExit(f"bench/writer.py: {piece!r} is no longer in the spool schema")
        found[name] = functools.partial(_relay, schema=schema.replace(piece, replacement),
                                        sender_id=1)
    found["floor (bench/_floor.py's store)"] = _floor_store
    return found


def _written() -> int:
    """Bytes this process has passed to write() so far (/proc/self/io ``wchar``)."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


def measure(make: Callable[[str], Callable[[int], Any]],
            groups: int) -> tuple[float, float, float]:
    """User and system CPU microseconds and bytes written per event over ``groups`` groups,
    after 100 groups of warm-up. The bytes (WAL pages: every page a commit dirtied) do not
    depend on the machine's noise; system time is mostly writing and fsyncing them."""
    with tempfile.TemporaryDirectory() as tmp:
        run = make(str(Path(tmp) / "spool.db"))
        for group in range(100):
            run(group)
        start, written = os.times(), _written()
        for group in range(100, 100 + groups):
            run(group)
        end, written = os.times(), _written() - written
        events = groups * GROUP
        return ((end.user - start.user) / events * 1e6,
                (end.system - start.system) / events * 1e6, written / events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    found = variants()
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in found}
    for _ in range(args.rounds):
        for name, make in found.items():
            runs[name].append(measure(make, args.groups))
    shipped = statistics.median(user for user, _, _ in runs["relay (as shipped)"])
    rows = []
    for name, times in runs.items():
        user = statistics.median(u for u, _, _ in times)
        rows.append((name, f"{user:.1f}", f"{user - shipped:+.1f}",
                     f"{statistics.median(s for _, s, _ in times):.1f}",
                     f"{statistics.median(w for _, _, w in times) / 1024:.1f}",
                     ", ".join(f"{u:.1f}" for u, _, _ in times)))
    table(f"SQLite writer, in process: {args.groups} groups of {GROUP} single events x "
          f"{len(ROUTES)} deliveries, fsync per group; median of {args.rounds}; {machine()}",
          ["writer", "user CPU us per event", "vs shipped", "system us", "KiB written",
           "each round (user)"],
          rows)


if __name__ == "__main__":
    main()
