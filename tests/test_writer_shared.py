"""The spool writer shared by server.workers: the real writer process with the supervisor's
socket and a listener that workers connect to. Answers go to the worker that asked, however
many jobs are in flight; a worker hears of work another one stored; the supervisor's socket
ends the writer's life."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.spool import writer
from relay.spool.wire import WAKE, IngestJob, StatsJob, request, split_jobs

TIMEOUT = 20.0


class Client:
    """One connection to the writer, reading frames with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.sock.settimeout(TIMEOUT)

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def _answers(self) -> list[Any]:
        """The answers (and wake-ups) in the frames received so far: a frame holds one or a
        list of them (wire.jobs_of)."""
        return split_jobs(self.buffer)

    def read(self, count: int) -> list[Any]:
        """The next ``count`` answers (a timeout fails the test)."""
        got = self._answers()
        while len(got) < count:
            data = self.sock.recv(1 << 20)
            assert data, "the writer closed the connection"
            self.buffer += data
            got += self._answers()
        assert len(got) == count, got
        return got

    def quiet(self, seconds: float = 0.3) -> list[Any]:
        """Whatever frames arrive within ``seconds`` (none expected, usually)."""
        self.sock.settimeout(seconds)
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                self.buffer += data
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(TIMEOUT)
        return self._answers()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Client, Any]]:
    """The writer process as the supervisor starts it: (process, the owner's end, a function
    that connects one more worker)."""
    path = str(tmp_path / "writer.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-P", writer.__file__, str(theirs.fileno()), str(tmp_path / "s.db"),
         "100000", "5", "0", str(listener.fileno())],
        pass_fds=[theirs.fileno(), listener.fileno()], stdin=subprocess.DEVNULL)
    theirs.close()
    listener.close()
    owner = Client(ours)
    workers: list[Client] = []

    def worker() -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        workers.append(client := Client(sock))
        sock.connect(path)
        assert client.read(1) == [(0, None, proc.pid)]   # each worker is told it is ready
        return client

    try:
        assert owner.read(1) == [(0, None, proc.pid)]
        yield proc, owner, worker
    finally:
        for client in workers:
            client.sock.close()
        ours.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ingest(event_id: str) -> IngestJob:
    now = time.time()
    return IngestJob(now, now - 86400, [(event_id, 1, now, "{}", [("d", "pending", None)])])


def test_every_job_of_a_burst_beyond_one_group_is_answered(shared: Any) -> None:
    """More jobs than one group holds (writer.MAX_GROUP), sent at once, then nothing more:
    every one is answered, to the worker that sent it, under its own job id."""
    _, _, connect = shared
    a, b = connect(), connect()
    many = writer.MAX_GROUP + 88
    a.send(*(request(n, StatsJob()) for n in range(1, many + 1)))
    b.send(*(request(n, StatsJob()) for n in range(1, 4)))
    assert sorted(job for job, _, _ in a.read(many)) == list(range(1, many + 1))
    assert sorted(job for job, _, _ in b.read(3)) == [1, 2, 3]


def test_a_worker_that_stored_work_with_another_still_hears_of_it(shared: Any) -> None:
    """Worker 0 and worker 1 both store events in one group: each is woken for the other's
    (worker 0 may have stored only a duplicate, which wakes nothing on its side)."""
    proc, owner, connect = shared
    zero, one = connect(), connect()
    zero.send(request(1, ingest("e-0")))
    assert [job for job, _, _ in zero.read(1)] == [1]
    assert [frame[0] for frame in one.read(1)] == [WAKE]   # another worker's events
    assert zero.quiet() == []                               # not its own
    os.kill(proc.pid, signal.SIGSTOP)   # both requests wait: the writer takes them as one group
    try:
        zero.send(request(2, ingest("e-0")))    # a duplicate: no new work of its own
        one.send(request(1, ingest("e-1")))
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    zero_got, one_got = zero.read(2), one.read(2)
    assert sorted(frame[0] for frame in zero_got) == [WAKE, 2]
    assert sorted(frame[0] for frame in one_got) == [WAKE, 1]
    assert owner.quiet() == []   # the supervisor delivers nothing: never woken


def test_a_worker_leaving_does_not_stop_the_writer_but_the_supervisor_does(shared: Any) -> None:
    proc, owner, connect = shared
    a = connect()
    a.sock.close()
    b = connect()
    b.send(request(7, StatsJob()))
    assert [job for job, _, _ in b.read(1)] == [7]
    assert proc.poll() is None
    owner.sock.close()
    assert proc.wait(timeout=30) == 0
