"""The spool's writer process: the only code that writes the SQLite file.

Why a process and not a thread: Python's sqlite3 releases the GIL around every SQLite call, and
a writer thread must win the GIL back from the event loop after each one. Under load every such
handoff measured 1-4 ms, so a group commit of a few statements took ~10 ms, and the writer's own
Python work (ids, rows) took GIL time from the HTTP server. In its own process the writer has its
own interpreter and core: the event loop only validates, routes and answers.

This module is the process's life: the spool's lock, start-up, the loop that takes every job
that arrived while the previous transaction was committing and hands them to
``Writer.run_group`` as one group (relay/spool/commit.py: one transaction, one fsync with
synchronous=FULL, then the answers; a group of attempt outcomes only commits with NORMAL), and
exit. The relay sends a 202 only after that answer, so an acknowledged event survives SIGKILL of
either process and power loss. The wire format is in
relay/spool/wire.py. The writer exits when the relay closes the socket (including when the relay
is killed) after finishing the group in hand; no job's exception ends it.

Started as a script by path (``python -P relay/spool/writer.py fd path max_events lock_wait
max_bytes [listen_fd]``; with server.workers > 1 the supervisor passes a listening socket):
it imports only the stdlib and light relay modules (relay.ids, the writer's own modules of
relay.spool, whose package ``__init__`` imports nothing until asked), so it starts in a fraction
of the relay's start-up time. It must never import the relay's side (asyncio, aiohttp, ...).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import selectors
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # started as a script: import relay from the tree this file is in
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay.spool.commit import Writer
from relay.spool.sqlite_schema import connect, migrate
from relay.spool.wire import (
    MIGRATING,
    WAKE,
    Answer,
    JobError,
    frame,
    frame_many,
    split_jobs,
)

MAX_GROUP = 512     # jobs per transaction: bounds the latency one group adds to the next
DRAIN_BYTES = 16 << 20  # what one read takes from the socket beyond a whole frame: a burst
                        # waits in the socket (and the relay), not here (2,000 ingests of
                        # 256 KiB queued at once: the writer's peak 96-550 MB -> 107-113 MB)


def _next_jobs(sock: socket.socket, buffer: bytearray) -> list[Any] | None:
    """Every job that has arrived (at least one, waiting for it), up to MAX_GROUP (whole
    frames: a frame holds a job or a list of them); None once the relay is gone."""
    jobs = split_jobs(buffer, MAX_GROUP)
    while not jobs:
        data = sock.recv(1 << 20)
        if not data:
            return None
        buffer += data
        while len(buffer) < DRAIN_BYTES:  # take what is already queued: that is the group
            try:
                more = sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if not more:
                break
            buffer += more
        jobs = split_jobs(buffer, MAX_GROUP)
    return jobs


def _frame_answers(answers: list[Answer]) -> bytes:
    """A client's answers, FRAME_JOBS to a frame; an error for a job whose result cannot
    travel (marshal refused it): the data is committed, but the writer must not die of one
    answer."""
    return frame_many(answers, lambda answer, exc: (
        answer[0], ("error", f"the spool writer cannot send this answer: {exc}", 0), None))


def lock(path: str, wait: float) -> int:
    """Hold ``<spool>.lock`` for this process's life: one writer per spool file. A writer left
    over from a relay that was just killed finishes its last group first (it exits when it sees
    the relay gone); another relay using the same spool.path is refused with its pid."""
    lock_path = path + ".lock"
    try:
        Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise JobError("error", f"cannot open spool {path}: {exc}") from exc
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                # (the hint of relay/listener.py's port in use: the usual cause is the same)
                raise JobError("error", f"the spool {path} is in use by another relay (pid "
                                        f"{holder}): another relay, or make run, still running? "
                                        f"Stop it, or give each relay its own spool.path"
                               ) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getppid()).encode(), 0)  # the relay's pid: what an operator stops
    return fd


def serve(sock: socket.socket, path: str, max_events: int, lock_wait: float,
          max_bytes: int = 0, listener: socket.socket | None = None) -> int:
    """Open the spool, say ready, then run groups until the relay closes the socket or says stop.

    With ``listener`` (server.workers > 1: ``sock`` is the supervisor's), worker processes
    connect there too; see ``_serve_many``."""
    try:
        lock(path, lock_wait)
        conn = connect(path)
        # a long migration is not a writer that failed to start: say so first
        migrate(conn, lambda old, new: sock.sendall(frame((MIGRATING, None, (old, new)))))
        writer = Writer(conn, max_events, max_bytes)
    except (sqlite3.Error, OSError, JobError) as exc:
        error = exc if isinstance(exc, JobError) else JobError("error", f"cannot open spool {path}: {exc}")
        sock.sendall(frame((0, error.wire(), None)))
        return 1
    sock.sendall(frame((0, None, os.getpid())))
    # The writer makes no reference cycles; collecting every 700 allocations (the default)
    # measured 5% of its time under load.
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)
    if listener is not None:
        try:
            _serve_many(sock, listener, writer)
        finally:
            conn.close()
        return 0
    buffer = bytearray()
    try:
        while (jobs := _next_jobs(sock, buffer)) is not None:
            stop = [job for job in jobs if job[1] == "stop"]
            work = [job for job in jobs if job[1] != "stop"]
            answers: list[Answer] = writer.run_group(work) if work else []
            answers += [(job_id, None, None) for job_id, _, _ in stop]
            sock.sendall(_frame_answers(answers))
            if stop:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass  # the relay is gone; what was committed stays committed
    finally:
        conn.close()
    return 0


SEND_TIMEOUT = 2.0   # a worker that reads no answer for this long is cut off (it reconnects):
                     # meanwhile the writer waits, and so does every other worker
WAKES = frozenset({"ingest", "replay"})  # jobs that give the dispatching worker new work


def _serve_many(owner: socket.socket, listener: socket.socket, writer: Writer) -> None:
    """Group commit for several clients: the owner (the supervisor, whose socket ends the
    writer's life) and every worker that connects to ``listener``.

    Each group takes every job any client has sent, as with one client. Job ids are each
    client's own, so they are renumbered for the group and answered to their sender. After a
    group that stored events or replayed deliveries, every other worker gets a wake frame
    (job id ``WAKE``): the worker that dispatches learns of work another one stored at once.
    """
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytearray] = {owner: bytearray()}
    selector.register(owner, selectors.EVENT_READ)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)
    ready = frame((0, None, os.getpid()))

    def drop(client: socket.socket) -> None:
        buffers.pop(client, None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(client)
        client.close()

    def send(client: socket.socket, data: bytes) -> None:
        try:
            client.sendall(data)
        except OSError:   # gone, or not reading for SEND_TIMEOUT: it reconnects if alive
            if client is owner:
                raise
            drop(client)

    backlog = False   # a full group left frames in the buffers: look again without waiting
    turn = 0          # the client whose frames go first: a full group must not starve the last
    stopping = False
    while not stopping:
        for key, _ in selector.select(0 if backlog else None):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            if client is listener:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    worker, _ = listener.accept()
                    worker.settimeout(SEND_TIMEOUT)
                    buffers[worker] = bytearray()
                    selector.register(worker, selectors.EVENT_READ)
                    send(worker, ready)
                continue
            try:
                data = client.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                if client is owner:
                    return   # the supervisor is gone: what was committed stays committed
                drop(client)
                continue
            buffers[client] += data
        clients = list(buffers)
        turn = (turn + 1) % len(clients)
        group: list[tuple[socket.socket, Any]] = []
        for client in clients[turn:] + clients[:turn]:
            group += [(client, job)
                      for job in split_jobs(buffers[client], MAX_GROUP - len(group))]
        backlog = len(group) >= MAX_GROUP
        if not group:
            continue
        requests = [(n, op, args) for n, (_, (_, op, args)) in enumerate(group)
                    if op != "stop"]
        answers: dict[int, tuple[Any, Any]] = dict.fromkeys(range(len(group)), (None, None))
        for n, error, result in (writer.run_group(requests) if requests else []):
            answers[n] = (error, result)
        out: dict[socket.socket, list[Answer]] = {}
        woke: set[socket.socket] = set()
        for n, (client, (job_id, op, _)) in enumerate(group):
            error, result = answers[n]
            out.setdefault(client, []).append((job_id, error, result))
            if op in WAKES and error is None:
                woke.add(client)
            stopping = stopping or (op == "stop" and client is owner)
        for client, answered in out.items():
            if client in buffers:
                send(client, _frame_answers(answered))
        if woke:   # every worker but the only one that stored work (it woke itself)
            wake = frame((WAKE, None, None))
            for client in list(buffers):
                if client is not owner and woke - {client}:
                    send(client, wake)


def main(argv: Sequence[str]) -> int:
    """``writer.py fd path max_events lock_wait [max_bytes]``: serve the relay on the inherited
    socket."""
    # The relay owns shutdown (it drains, then closes the socket); a Ctrl-C or SIGTERM sent to
    # the whole process group must not stop the writer before the relay's last commit.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    fd, path, max_events, lock_wait = int(argv[1]), argv[2], int(argv[3]), float(argv[4])
    max_bytes = int(argv[5]) if len(argv) > 5 else 0
    listen_fd = int(argv[6]) if len(argv) > 6 else -1
    listener = socket.socket(fileno=listen_fd) if listen_fd >= 0 else None
    with socket.socket(fileno=fd) as sock:
        return serve(sock, path, max_events, lock_wait, max_bytes, listener)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
