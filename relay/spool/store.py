"""The spool's engine on the relay's side: a writer process for every write, a reader thread.

Writes go to the writer process (relay/spool/writer.py, which explains why it is a process)
over a socketpair, as the jobs of relay/spool/wire.py: ``_call`` queues a job, the jobs queued
during one event-loop turn leave in one write (attempt outcomes may wait up to 2 ms for
company), and each job's future resolves when the writer answers, which it does only after the
group's COMMIT. So a 202 is never sent for data that a SIGKILL could lose. If the writer dies,
waiting jobs fail (the sender sees 503 and retries) and a new writer is started.

Reads use their own connection on a reader thread (WAL lets them run beside the writer). The
event loop never touches the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import SpoolError, SpoolFull
from relay.spool import writer
from relay.spool.sqlite_schema import connect
from relay.spool.wire import (
    MIGRATING,
    WAKE,
    Job,
    JobError,
    PageLimitJob,
    StatsJob,
    StopJob,
    frame_many,
    message,
    split_jobs,
)

log = logging.getLogger("relay.spool")

T = TypeVar("T")
LOCK_WAIT = 10.0       # how long a new writer waits for the spool's lock (a killed relay's
                       # writer finishing its last group) before naming the relay that holds it
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# Attempt outcomes wait up to this long for others to share their commit (a write that is due
# anyway takes them at once). 2 ms per outcome, at most: no sender waits on it, and an attempt
# gives its request slots back as soon as its response is in (relay.dispatch).
COALESCE_SECONDS = 0.002
FILE_CHECK_SECONDS = 1.0   # how often the file at spool.path is compared with the one open
                           # (and the writer's silence measured)
WRITER_SILENT = 10.0       # a writer with jobs that has said nothing this long is stalled
COALESCE_JOBS = 256


class Store:
    """The writer process, the link to it, and the reader thread; the Spool's operations are
    built on ``_call`` (writes) and ``_read`` (reads)."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_events: int = 1_000_000,
        max_bytes: int = 0,
        dedupe_window: float = 86400.0,
        clock: Callable[[], float] = time.time,
        writer_socket: str | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        self.path = str(path)
        self.max_events = max_events
        self.max_bytes = max_bytes      # spool.max_bytes: the writer refuses new events past it
        self.dedupe_window = dedupe_window
        self.clock = clock
        self.is_open = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_job = 1
        self._out: list[tuple[int, str, Any]] = []   # requests for the next write (framed
                                                     # FRAME_JOBS at a time: wire.frame_many)
        self._flush_soon = False      # a write is due at the end of this loop turn
        self._flush_later: asyncio.TimerHandle | None = None  # a write is due for outcomes
        self._buffer = bytearray()
        self._closing = False
        self._up = False            # a writer said ready and has not gone away since
        self._respawn: asyncio.Task[None] | None = None
        self._migrating = False     # the writer said it is migrating the schema: no start timeout
        # The file at ``path`` when opened (device, inode), looked at every FILE_CHECK_SECONDS:
        # removed or replaced under a running relay, it is no longer where the events go
        # (the writer keeps writing to the open, unlinked file), and ``_gone`` says why.
        self._file_id: tuple[int, int] | None = None
        self._gone: str | None = None
        self._watcher: asyncio.TimerHandle | None = None
        # The writer last answered (or was given work while it owed none) at ``_heard``
        # (monotonic): with jobs owed and nothing heard for WRITER_SILENT (a disk that stopped
        # answering, a stopped process), ``_stalled`` says so until it answers again.
        self._heard = time.monotonic()
        self._stalled: str | None = None
        # server.workers > 1: a worker connects to the supervisor's writer at ``writer_socket``
        # instead of starting one; the supervisor's writer also takes connections on
        # ``listener``. ``on_wake`` runs when another worker stored work (the writer says so)
        # and when a writer is reached again after a failure.
        self.writer_socket = writer_socket
        self.listener = listener
        self.on_wake: Callable[[], None] | None = None
        # Two readers, each a thread with its own connection: the dispatcher's reads of due
        # work never queue behind the API's listings and counts, nor those behind it.
        self._lanes = {"work": _Reader(self.path, "work"), "api": _Reader(self.path, "api")}

    @property
    def writable(self) -> bool:
        """A writer is up and taking jobs (False while a killed one is being replaced, and
        for good once the file was removed or replaced)."""
        return self._up and not self._closing and self._gone is None and self._stalled is None

    @property
    def unavailable(self) -> str | None:
        if self._closing:
            return "the spool is closing"
        if self._gone is not None:
            return self._gone
        if self._stalled is not None:
            return self._stalled
        return None if self._up else "the spool writer is restarting"

    def _check_silence(self) -> None:
        """A writer that owes answers and has said nothing for WRITER_SILENT is stalled: new
        jobs are refused (ingest 503, not a sender held for as long as the disk hangs) and
        /readyz says why, until it answers again. (Its jobs already sent stay queued: their
        groups may still commit.)"""
        silent = time.monotonic() - self._heard
        if self._pending and silent >= WRITER_SILENT:
            if self._stalled is None:
                self._stalled = (f"the spool writer has not answered for {silent:.0f} s (a "
                                 f"disk that does not answer, a stopped process?): events "
                                 f"are refused (503) until it does")
                log.error("%s", self._stalled)
        elif self._stalled is not None:
            self._stalled = None
            log.warning("the spool writer answers again: events are taken")

    def _watch(self) -> None:
        """Every FILE_CHECK_SECONDS while open: has the writer gone silent (_check_silence),
        and is ``path`` still the file the writer has open? A spool file removed under a
        running relay (a cleanup job, a wrong ``rm``) took every event answered 202 after it,
        and every pending one, to a file no relay would open again: answered 202, and lost
        at the next start, with nothing said."""
        self._watcher = None
        if self._closing or self._loop is None or self._gone is not None:
            return
        self._check_silence()
        if _file_id(self.path) != self._file_id:
            self._gone = (f"the spool file {self.path} was removed or replaced while the "
                          f"relay ran: events are refused (503) and deliveries stop until the "
                          f"relay is restarted; what was pending in the removed file is not in "
                          f"the new one (restore it from a backup to keep it)")
            log.error("%s", self._gone)
            return
        self._watcher = self._loop.call_later(FILE_CHECK_SECONDS, self._watch)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the writer (it creates or migrates the file) and open the reader."""
        self._loop = asyncio.get_running_loop()
        self._closing = False
        await self._start_writer()
        await self._read(lambda conn: None)
        self._file_id, self._gone = _file_id(self.path), None
        self._watcher = self._loop.call_later(FILE_CHECK_SECONDS, self._watch)
        self.is_open = True

    async def close(self) -> None:
        """Let the writer finish every queued job and commit, then stop it and the reader."""
        if self._loop is None:
            return
        self._closing = True
        self.is_open = False
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._respawn is not None:
            self._respawn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._respawn
        if self._transport is not None:
            if self.writer_socket is None:
                with contextlib.suppress(SpoolError):
                    await asyncio.wait_for(self._call(StopJob()), STOP_TIMEOUT)
            elif self._pending:   # the writer is shared: only wait for our own jobs' answers
                await asyncio.wait(list(self._pending.values()), timeout=STOP_TIMEOUT)
            self._transport.close()
        await self._reap()
        for lane in self._lanes.values():
            await lane.close()
        self._loop = None

    async def _start_writer(self) -> None:
        """Start the writer process (or, as a worker of server.workers > 1, connect to the
        supervisor's) and wait for its ready."""
        assert self._loop is not None
        if self.writer_socket is not None:
            await self._handshake(f"cannot reach the spool writer at {self.writer_socket}",
                                  path=self.writer_socket)
            return
        ours, theirs = socket.socketpair()
        passed = [theirs.fileno()] + ([self.listener.fileno()] if self.listener else [])
        try:
            # -P: the script's directory (relay/spool) must not shadow stdlib modules (queue).
            # Popen, not asyncio's subprocess API: one fork/exec at start-up (no loop time worth
            # saving), and it behaves the same on uvloop and on loops in other threads (tests).
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-P", writer.__file__, str(theirs.fileno()), self.path,
                 str(self.max_events), str(LOCK_WAIT), str(self.max_bytes),
                 str(self.listener.fileno() if self.listener else -1)],
                pass_fds=passed, stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise SpoolError(f"cannot start the spool writer: {exc}") from exc
        finally:
            theirs.close()
        await self._handshake("the spool writer did not start", sock=ours)

    async def _handshake(self, failure: str, *, sock: socket.socket | None = None,
                         path: str | None = None) -> None:
        """Connect the link (over ``sock``, or to the socket at ``path``) and wait for the
        writer's ready; on failure drop the link and our writer process, if any, and raise
        SpoolError starting with ``failure``."""
        assert self._loop is not None
        ready = self._loop.create_future()
        self._pending = {0: ready}
        self._buffer.clear()
        try:
            self._transport, _ = await self._loop.create_unix_connection(
                lambda: _Link(self), path, sock=sock)
            self._migrating = False
            waited = 0.0
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT)
                    break
                except TimeoutError:
                    if not self._migrating:  # a migration takes what it takes; a writer that
                        raise                # dies meanwhile fails ``ready`` (_lost)
                    waited += START_TIMEOUT
                    log.warning("still migrating the spool %s (%.0f s so far)", self.path, waited)
        except (OSError, TimeoutError, SpoolError, asyncio.CancelledError) as exc:
            # (cancelled: the relay is stopping while it waits; drop this writer too)
            ready.cancel()     # (if still waiting) nobody will read it now
            self._up = False   # a ready that came as the wait ran out: this writer is dropped
            if self._transport is not None:
                self._transport.close()
                self._transport = None
            elif sock is not None:
                sock.close()
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()  # it said nothing in time, or we cannot talk to it
            await self._reap()
            if isinstance(exc, SpoolError | asyncio.CancelledError):
                raise
            reason = f"no answer within {START_TIMEOUT:g}s" if isinstance(exc, TimeoutError) else exc
            raise SpoolError(f"{failure}: {reason}") from None

    async def _reap(self) -> None:
        """Wait for the writer process to exit (kill it if it will not), by its PID."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, proc.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("the spool writer (pid %d) did not exit; killing it", proc.pid)
            proc.kill()
            await asyncio.get_running_loop().run_in_executor(None, proc.wait)

    # -- writes ----------------------------------------------------------------------------

    def _call(self, job: Job, *, urgent: bool = True) -> asyncio.Future[Any]:
        """Queue one job for the writer; the future resolves once its group is committed, with
        the job's result or a SpoolError (SpoolFull) saying why it failed.

        An ``urgent`` job leaves at the end of this event-loop turn, with everything queued.
        Others (attempt outcomes: nobody waits for their answer but the attempt's own task)
        wait up to COALESCE_SECONDS for company, so that they share commits: the writer's
        cost per outcome is mostly its transaction's (docs/performance.md)."""
        if self._transport is None or self._loop is None:
            raise SpoolError("the spool is closed" if self._closing or self._loop is None
                             else "the spool writer is restarting")
        if not isinstance(job, StopJob):
            refused = self._gone or self._stalled
            if refused is not None:
                raise SpoolError(refused)
            if not self._pending:   # (owed nothing until now: its silence counts from here)
                self._heard = time.monotonic()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[self._next_job] = future
        self._out.append(message(self._next_job, job))
        self._next_job += 1
        if urgent or len(self._out) >= COALESCE_JOBS:
            if not self._flush_soon:
                self._flush_soon = True
                self._loop.call_soon(self._flush)
        elif self._flush_later is None and not self._flush_soon:
            self._flush_later = self._loop.call_later(COALESCE_SECONDS, self._flush)
        return future

    def _flush(self) -> None:
        self._flush_soon = False
        if self._flush_later is not None:
            self._flush_later.cancel()
            self._flush_later = None
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.write(frame_many(out, self._refused))

    def _refused(self, job: tuple[int, str, Any], exc: ValueError) -> None:
        """A job the wire cannot carry (a value marshal refuses: a bug; or over 4 GiB) fails
        alone with a ValueError, as a job that could not be framed always did, and is left
        out: not a SpoolError, which the dispatcher takes for an outage of the spool and
        pauses on, retrying an outcome that can never be sent."""
        future = self._pending.pop(job[0], None)
        if future is not None and not future.done():
            future.set_exception(ValueError(f"cannot send this {job[1]} job to the spool "
                                            f"writer: {exc}"))

    def _received(self, data: bytes) -> None:
        self._heard = time.monotonic()
        self._buffer += data
        for job, error, result in split_jobs(self._buffer):
            if job == WAKE:
                if self.on_wake is not None:
                    self.on_wake()
                continue
            if job == MIGRATING:
                self._migrating = True
                log.warning("migrating the spool %s from schema %d to %d before starting; this "
                            "takes a few seconds per million deliveries", self.path, *result)
                continue
            future = self._pending.pop(job, None)
            if future is None or future.done():  # the caller went away; the data is committed
                continue
            if error is None:
                if job == 0:   # ready: writable now, before any answer in the same data wakes
                    self._up = True   # its caller (open() waits for ready a step later)
                future.set_result(result)
            else:
                kind, message, retry_after = error
                future.set_exception(SpoolFull(message, retry_after=retry_after) if kind == "full"
                                     else SpoolError(message))

    def _lost(self) -> None:
        self._transport = None
        self._out = []   # their jobs fail below: none may reach a writer reached again
        code = self._proc.poll() if self._proc is not None else None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(SpoolError(
                    f"the spool writer exited (code {code}) before answering"))
        was_up, self._up = self._up, False
        if was_up and not self._closing and self._loop is not None:
            if self.writer_socket is not None:
                log.error("lost the connection to the spool writer; reconnecting")
            else:
                log.error("the spool writer exited unexpectedly (code %s); starting a new one",
                          code)
            self._respawn = self._loop.create_task(self._restart())

    async def _restart(self) -> None:
        await self._reap()
        shared = self.writer_socket is not None
        while not self._closing:
            try:
                await self._start_writer()
                log.warning("connected to the spool writer again" if shared
                            else "the spool writer is running again")
                if self.on_wake is not None:
                    # Wakes sent while disconnected were lost, and the last group may have
                    # been committed without its answers: look now.
                    self.on_wake()
                return
            except SpoolError as exc:
                if not shared:
                    log.error("cannot restart the spool writer: %s", exc)
                await asyncio.sleep(0.2 if shared else 1.0)   # the supervisor restarts it

    # -- reads -----------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T], lane: str = "work") -> T:
        """Run ``fn`` on a reader thread: lane "work" (the dispatcher) or "api" (listings,
        counts, metrics)."""
        return await self._lanes[lane].run(fn)

    async def stats(self) -> dict[str, int]:
        """The writer's counts: ``open_events`` (events with a delivery still pending, checked
        against spool.max_events), ``groups`` (transactions run since it started) and ``bytes``
        (the file's bytes in use, free pages not counted, checked against spool.max_bytes)."""
        result: dict[str, int] = await self._call(StatsJob())
        return result

    async def page_limit(self, pages: int | None) -> int:
        """Let the spool file grow by at most ``pages`` more pages (None: no cap); returns its
        page count. Tests use it to make SQLite report a full disk."""
        result: int = await self._call(PageLimitJob(pages))
        return result


def _file_id(path: str) -> tuple[int, int] | None:
    """The file at ``path`` (device, inode), or None when there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


class _Link(asyncio.Protocol):
    def __init__(self, store: Store) -> None:
        self.store = store

    def data_received(self, data: bytes) -> None:
        self.store._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.store._lost()


class _Reader:
    """One reader thread with its own connection to the spool file (WAL: beside the writer)."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"relay-spool-{name}")
        self._conn: sqlite3.Connection | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._conn is None:
                self._conn = connect(self.path)
            try:
                return fn(self._conn)
            except sqlite3.Error as exc:
                raise SpoolError(f"spool read failed: {exc}") from exc

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except JobError as exc:
            raise SpoolError(exc.message) from exc

    async def close(self) -> None:
        def shut(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        if self._conn is not None:
            await self.run(shut)
        self._pool.shutdown(wait=True)
