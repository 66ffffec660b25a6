"""The floor: the least a durable relay must do, on the same stack (aiohttp + uvloop + SQLite).

It answers POST /v1/events with 202 only once the events and one delivery row per destination
are committed (WAL, fsync per group commit, one writer thread taking every queued ingest as one
group: the relay's own policy). With a target URL it then sends each event from memory (64 at a
time, the forwarder's body) and records every outcome durably (UPDATE of the delivery row, in
groups, no fsync of its own, as the relay does). No validation beyond "an object with an id",
no dedupe beyond a UNIQUE index, no retries, no metrics, no logs: what is left is the cost of
durability itself, so a target below this server's figures cannot be met on this stack.

Usage: python bench/_floor.py PORT DB_PATH DESTINATIONS [TARGET_URL]
"""

import asyncio
import json
import sqlite3
import sys
import threading
import time
from queue import Empty, SimpleQueue
from typing import Any

import uvloop
from aiohttp import ClientSession, TCPConnector, web

PORT, PATH, FAN_OUT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
TARGET = sys.argv[4] if len(sys.argv) > 4 else None

db = sqlite3.connect(PATH, check_same_thread=False, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, "
           "body TEXT NOT NULL, created REAL NOT NULL)")
db.execute("CREATE TABLE IF NOT EXISTS deliveries (seq INTEGER PRIMARY KEY, event_seq INTEGER, "
           "destination INTEGER, state TEXT, attempts INTEGER, status INTEGER, due REAL)")
db.execute("CREATE INDEX IF NOT EXISTS due ON deliveries (state, due)")
jobs: SimpleQueue[tuple[str, Any, asyncio.Future[Any] | None]] = SimpleQueue()
loop: asyncio.AbstractEventLoop


def write_forever() -> None:
    """Every queued job in one transaction; FULL (fsync) when it holds an ingest."""
    event_seq = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    delivery_seq = db.execute("SELECT coalesce(max(seq), 0) FROM deliveries").fetchone()[0]
    while True:
        group = [jobs.get()]
        while True:
            try:
                group.append(jobs.get_nowait())
            except Empty:
                break
        now, events, deliveries, outcomes, answers = time.time(), [], [], [], []
        for kind, payload, future in group:
            if kind == "outcome":
                outcomes.append(payload)
                continue
            seqs = []
            for one in payload:
                event_seq += 1
                events.append((event_seq, one["id"], json.dumps(one), now))
                for destination in range(FAN_OUT):
                    delivery_seq += 1
                    deliveries.append((delivery_seq, event_seq, destination, "pending", 0, None,
                                       now))
                    seqs.append(delivery_seq)
            answers.append((future, seqs))
        db.execute(f"PRAGMA synchronous={'FULL' if events else 'NORMAL'}")
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?,?)", events)
        db.executemany("INSERT INTO deliveries VALUES (?,?,?,?,?,?,?)", deliveries)
        db.executemany("UPDATE deliveries SET state = ?, attempts = 1, status = ? WHERE seq = ?",
                       outcomes)
        db.execute("COMMIT")
        loop.call_soon_threadsafe(_answer, answers)


def _answer(answers: list[tuple[asyncio.Future[Any], list[int]]]) -> None:
    for future, seqs in answers:
        if not future.done():
            future.set_result(seqs)


async def forward(event: dict[str, Any], seq: int, session: ClientSession,
                  limit: asyncio.Semaphore) -> None:
    async with limit:
        body = json.dumps({"dispatch_id": event.get("message_id"), "status": event["status"]})
        async with session.post(TARGET, data=body,  # type: ignore[arg-type]
                                headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
        jobs.put(("outcome", ("delivered" if resp.status < 300 else "failed", resp.status, seq),
                  None))


async def ingest(request: web.Request) -> web.Response:
    try:
        parsed = json.loads(await request.read())
    except ValueError:
        return web.json_response({"error": "body is not JSON"}, status=400)
    events = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(one, dict) and isinstance(one.get("id"), str) for one in events):
        return web.json_response({"error": "every event needs an id"}, status=400)
    future = loop.create_future()
    jobs.put(("ingest", events, future))
    seqs = await future
    if TARGET is not None:
        app = request.app
        for event, seq in zip(events, seqs, strict=True):
            task = asyncio.create_task(forward(event, seq, app["session"], app["limit"]))
            app["tasks"].add(task)
            task.add_done_callback(app["tasks"].discard)
    return web.json_response({"events": [{"id": one["id"]} for one in events]}, status=202)


async def context(app: web.Application):  # type: ignore[no-untyped-def]
    global loop
    loop = asyncio.get_running_loop()
    threading.Thread(target=write_forever, daemon=True).start()
    app["session"] = ClientSession(connector=TCPConnector(limit=64))
    app["limit"], app["tasks"] = asyncio.Semaphore(64), set()
    yield
    await app["session"].close()


app = web.Application(client_max_size=1 << 22)
app.cleanup_ctx.append(context)
app.router.add_post("/v1/events", ingest)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, print=None)
