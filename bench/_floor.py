"""The floor: a lean durable relay on the same stack (aiohttp + uvloop + SQLite), to measure
what durability itself costs beside the bare server and the forwarder.

It answers POST /v1/events with 202 only once the events and one delivery row per destination
are committed (WAL, fsync per group commit: the relay's policy), by a writer that takes every
job queued meanwhile as one group (up to the relay writer's MAX_GROUP jobs). With a target URL
it then sends each event from memory (64 at a time, the forwarder's body) and records every
outcome durably (an UPDATE of the delivery row, in groups, no fsync of its own, as the relay
does). Nothing else: no validation beyond "objects with a string id", no dedupe, no retries,
no metrics, no logs. Event ids must be unique (the benches' are).

The writer is a second process fed over a socketpair, as the relay's is (``--writer process``,
the default: the event loop keeps the GIL to itself), or a thread of this process
(``--writer thread``: no IPC, but every group hands the GIL back and forth). Measured figures
for both are in docs/performance.md.

Usage: python bench/_floor.py PORT DB_PATH DESTINATIONS [TARGET_URL] [--writer process|thread]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any

import uvloop
from aiohttp import ClientSession, TCPConnector, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from relay.spool.wire import frame, split_frames
from relay.spool.writer import _next_jobs

Job = tuple[int, str, Any]   # (job id, "ingest" | "outcome", payload)


class Store:
    """The SQLite side: one transaction per group of jobs."""

    def __init__(self, path: str, fan_out: int) -> None:
        self.fan_out = fan_out
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, id TEXT, "
                        "body TEXT NOT NULL, created REAL NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS deliveries (seq INTEGER PRIMARY KEY, "
                        "event_seq INTEGER, destination INTEGER, state TEXT, attempts INTEGER, "
                        "status INTEGER, due REAL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS due ON deliveries (state, due)")
        self.event_seq = self.db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        self.delivery_seq = self.db.execute(
            "SELECT coalesce(max(seq), 0) FROM deliveries").fetchone()[0]
        self.synchronous = ""

    def commit(self, group: list[Job]) -> list[tuple[int, Any]]:
        """Every job of the group in one transaction; (job id, delivery seqs per event) for each
        ingest, or (job id, None) for all of them if the transaction failed."""
        now, events, deliveries, outcomes, answers = time.time(), [], [], [], []
        counts = self.event_seq, self.delivery_seq
        for job_id, kind, payload in group:
            if kind == "outcome":
                outcomes.append(payload)
                continue
            per_event = []
            for event_id, body in payload:
                self.event_seq += 1
                events.append((self.event_seq, event_id, body, now))
                seqs = []
                for destination in range(self.fan_out):
                    self.delivery_seq += 1
                    deliveries.append((self.delivery_seq, self.event_seq, destination, "pending",
                                       0, None, now))
                    seqs.append(self.delivery_seq)
                per_event.append(seqs)
            answers.append((job_id, per_event))
        try:
            synchronous = "FULL" if events else "NORMAL"  # outcomes alone: no fsync of their own
            if synchronous != self.synchronous:
                self.db.execute(f"PRAGMA synchronous={synchronous}")
                self.synchronous = synchronous
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT INTO events VALUES (?,?,?,?)", events)
            self.db.executemany("INSERT INTO deliveries VALUES (?,?,?,?,?,?,?)", deliveries)
            self.db.executemany("UPDATE deliveries SET state = ?, attempts = 1, status = ? "
                                "WHERE seq = ?", outcomes)
            self.db.execute("COMMIT")
        except Exception as exc:  # nothing of the group is stored: its ingests answer 500
            print(f"group of {len(group)} jobs failed: {exc!r}", file=sys.stderr, flush=True)
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.event_seq, self.delivery_seq = counts
            return [(job_id, None) for job_id, _ in answers]
        return answers


def writer_process(fd: int, path: str, fan_out: int) -> None:
    """The writer process: every group of jobs that has arrived, committed, answered in order
    (the relay's own framing and group-taking: relay/spool/wire.py, relay/spool/writer.py)."""
    store, buffer = Store(path, fan_out), bytearray()
    with socket.socket(fileno=fd) as sock:
        while (jobs := _next_jobs(sock, buffer)) is not None:
            sock.sendall(frame(store.commit(jobs)))


class ProcessWriter(asyncio.Protocol):
    """The event loop's side of the writer process: jobs sent once per loop iteration."""

    def __init__(self, path: str, fan_out: int) -> None:
        self.pending: list[Job] = []
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.buffer = bytearray()
        self.ids = 0
        self.transport: Any = None   # uvloop's transports are not asyncio.Transport
        ours, theirs = socket.socketpair()
        self.child = subprocess.Popen([sys.executable, __file__, "--child", str(theirs.fileno()),
                                       path, str(fan_out)], pass_fds=(theirs.fileno(),))
        theirs.close()
        self.sock = ours

    async def start(self) -> None:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self, self.sock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def submit(self, kind: str, payload: Any, future: asyncio.Future[Any] | None) -> None:
        self.ids += 1
        if future is not None:
            self.waiting[self.ids] = future
        if not self.pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self.pending.append((self.ids, kind, payload))

    def _flush(self) -> None:
        self.transport.write(frame(self.pending))
        self.pending = []

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for answers in split_frames(self.buffer):
            for job_id, seqs in answers:
                future = self.waiting.pop(job_id, None)
                if future is not None and not future.done():
                    future.set_result(seqs)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        # The transport closes on the loop's next turn, which this wait would block: end the
        # connection now, so the child reads EOF (shutdown reaches the transport's copy too).
        self.sock.shutdown(socket.SHUT_RDWR)
        self.child.wait(timeout=10)


class ThreadWriter:
    """The writer as a thread of this process."""

    def __init__(self, path: str, fan_out: int) -> None:
        self.store = Store(path, fan_out)
        self.jobs: SimpleQueue[tuple[Job, asyncio.Future[Any] | None]] = SimpleQueue()
        self.ids = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, args=(loop,), daemon=True).start()

    def submit(self, kind: str, payload: Any, future: asyncio.Future[Any] | None) -> None:
        self.ids += 1
        self.jobs.put(((self.ids, kind, payload), future))

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            taken = [self.jobs.get()]
            while True:
                try:
                    taken.append(self.jobs.get_nowait())
                except Empty:
                    break
            futures = {job[0]: future for job, future in taken if future is not None}
            answers = self.store.commit([job for job, _ in taken])
            loop.call_soon_threadsafe(_answer, [(futures[i], seqs) for i, seqs in answers])

    def close(self) -> None:
        pass


def _answer(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, seqs in answers:
        if not future.done():
            future.set_result(seqs)


def make_app(writer: ProcessWriter | ThreadWriter, target: str | None) -> web.Application:
    submit: Callable[[str, Any, asyncio.Future[Any] | None], None] = writer.submit
    limit = asyncio.Semaphore(64)
    tasks: set[asyncio.Task[None]] = set()

    async def forward(event: dict[str, Any], seqs: list[int], session: ClientSession) -> None:
        async with limit:
            body = json.dumps({"dispatch_id": event.get("message_id"),
                               "status": event.get("status")})
            try:
                async with session.post(target,  # type: ignore[arg-type]
                                        data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    status = resp.status
            except Exception:  # recorded as failed, like any other outcome
                status = 0
        for seq in seqs:
            submit("outcome", ("delivered" if 200 <= status < 300 else "failed", status, seq),
                   None)

    async def ingest(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        single = not isinstance(parsed, list)
        events = [parsed] if single else parsed
        if not all(isinstance(one, dict) and isinstance(one.get("id"), str) for one in events):
            return web.json_response({"error": "every event needs a string id"}, status=400)
        bodies = [raw.decode()] if single else [json.dumps(one) for one in events]
        future = asyncio.get_running_loop().create_future()
        submit("ingest", [(one["id"], body) for one, body in zip(events, bodies, strict=True)],
               future)
        per_event = await future
        if per_event is None:
            return web.json_response({"error": "not stored"}, status=500)
        if target is not None:
            for event, seqs in zip(events, per_event, strict=True):
                task = asyncio.create_task(forward(event, seqs, request.app["session"]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        return web.json_response({"events": [{"id": one["id"]} for one in events]}, status=202)

    async def context(app: web.Application):  # type: ignore[no-untyped-def]
        await writer.start()
        app["session"] = ClientSession(connector=TCPConnector(limit=64))
        yield
        await app["session"].close()
        writer.close()

    app = web.Application(client_max_size=1 << 22)
    app.cleanup_ctx.append(context)
    app.router.add_post("/v1/events", ingest)
    return app


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        writer_process(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("destinations", type=int)
    parser.add_argument("target", nargs="?")
    parser.add_argument("--writer", choices=("process", "thread"), default="process")
    args = parser.parse_args()
    writer = (ProcessWriter if args.writer == "process" else ThreadWriter)(args.path,
                                                                          args.destinations)
    uvloop.install()
    web.run_app(make_app(writer, args.target), host="127.0.0.1", port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
