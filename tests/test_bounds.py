"""Issue 14, bounded and supervised: what one client sends must not cost the relay (or other
clients) more than its size. Real relay subprocesses; memory is read from /proc (relay plus its
spool writer). bench/abuse.py measures the same scenarios with numbers.
"""

from __future__ import annotations

import json
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RelayProcess, http, write_config
from tests.receiver import Answer, Receiver

MAX_BODY = 1_048_576
TOKEN = "bounds-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _rss_mb(pid: int) -> float:
    """Resident memory of the relay and its children (the spool writer), in MB."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    total = 0
    for member in (pid, *map(int, children)):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class PeakRss:
    """Samples the relay's RSS every 5 ms in a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self.peak = _rss_mb(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss_mb(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10)
        self.peak = max(self.peak, _rss_mb(self.pid))

    @property
    def growth(self) -> float:
        return self.peak - self.base


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Start relays with config sections of the test's choosing; all are stopped at the end."""
    started: list[RelayProcess] = []

    def start(**sections: Any) -> RelayProcess:
        sections.setdefault("destinations", [
            {"name": "braze", "format": "braze", "url": "http://127.0.0.1:9/braze"}])
        path = write_config(tmp_path, **sections)
        proc = RelayProcess(path, tmp_path / "relay.log")
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def _raw(url: str, head: bytes, body: bytes = b"") -> int:
    """Send ``head`` (request line and headers, as raw bytes) and ``body``; the status code."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + b"\r\n" + body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def _timed_post(url: str, body: bytes) -> tuple[float, int, Any]:
    start = time.perf_counter()
    status, _, answer = http("POST", f"{url}/v1/events", body, timeout=120)
    return time.perf_counter() - start, status, answer


# -- (a) an invalid batch costs what its size costs ----------------------------------------


def test_invalid_max_size_batch_is_refused_cheaply(relay: Callable[..., RelayProcess]) -> None:
    """A max-size `[{},{},...]` batch gets a 400 with at most 20 details plus a count of the
    rest, and the relay grows by less than 100 MB. (How long it takes beside a valid body of
    the same size is a figure of bench/abuse.py: a timed ratio here failed on noisy machines.)"""
    proc = relay()
    assert proc.proc is not None
    count = (MAX_BODY - 1) // 3
    invalid = b"[" + b"{}," * (count - 1) + b"{}]"
    pad = (MAX_BODY - 500 * 120) // 500

    def valid(run: int) -> bytes:
        # "delayed": braze cannot express it, so nothing is sent anywhere.
        return json.dumps([{"id": f"v{run}-{i}", "channel": "email", "status": "delayed",
                            "message_id": f"m-{i}", "attributes": {"pad": "x" * pad}}
                           for i in range(500)]).encode()

    for run in range(3):   # the same memory baseline as before: valid bodies of this size
        _, status, _ = _timed_post(proc.url, valid(run))
        assert status == 202
    with PeakRss(proc.proc.pid) as rss:
        _, status, answer = _timed_post(proc.url, invalid)
    assert status == 400, answer
    details = answer["details"]
    assert len(details) <= 21, f"{len(details)} details"
    assert "more" in details[-1]["message"], details[-1]
    assert rss.growth < 100, f"RSS grew by {rss.growth:.0f} MB"


# -- (b) numbers JSON cannot carry are refused ----------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_attributes_are_refused(relay: Callable[..., RelayProcess],
                                                      literal: str) -> None:
    """A non-finite number anywhere in attributes is a 400 whose details name its path."""
    proc = relay()
    body = b'{"channel": "email", "status": "delivered", "message_id": "m-1", ' \
        b'"attributes": {"x": {"y": [1, ' + literal.encode() + b"]}}}"
    status, _, answer = http("POST", f"{proc.url}/v1/events", body)
    assert status == 400, answer
    assert "attributes.x.y[1]" in [d["path"] for d in answer["details"]], answer


# -- (c) hostile input to the API is a 4xx, and the writer survives -------------------------


def _deep_json(depth: int) -> bytes:
    return b'{"delivery_ids": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE: list[tuple[str, str, str, bytes | None]] = [
    ("failed_since 2**70", "POST", "/v1/deliveries/retry",
     json.dumps({"failed_since": 2**70}).encode()),
    ("next=10**30", "GET", f"/v1/deliveries?next={10**30}", None),
    ("limit=10**30", "GET", f"/v1/deliveries?limit={10**30}", None),
    ("JSON nested 100000 deep", "POST", "/v1/deliveries/retry", _deep_json(100_000)),
]
@pytest.mark.parametrize(("name", "method", "path", "body"),
                         [pytest.param(*case, id=case[0]) for case in HOSTILE])
def test_hostile_api_input_is_a_client_error(relay: Callable[..., RelayProcess], name: str,
                                             method: str, path: str, body: bytes | None) -> None:
    """Out-of-range numbers and deeply nested JSON get a 4xx, and the spool writer lives on."""
    proc = relay(server={"token": TOKEN})
    writer = proc.writer_pid()
    status, _, answer = http(method, proc.url + path, body, headers=AUTH)
    time.sleep(0.2)  # a writer killed by the request would be gone by now
    assert (status // 100, _writer_or_none(proc)) == (4, writer), (status, answer)


def _writer_or_none(proc: RelayProcess) -> int | None:
    """The writer's pid, or None between a dead writer and its replacement."""
    try:
        return proc.writer_pid()
    except ValueError:
        return None


@pytest.mark.parametrize("method", ["POST /v1/events", "GET /v1/deliveries"])
def test_non_ascii_authorization_is_a_401(relay: Callable[..., RelayProcess],
                                          method: str) -> None:
    """An Authorization header with bytes that are not ASCII is a 401, and the writer lives on."""
    proc = relay(server={"token": TOKEN})
    writer = proc.writer_pid()
    body = b'{"channel": "email", "status": "delivered", "message_id": "m"}' \
        if method.startswith("POST") else b""
    head = (method.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\xfe\xe9t\xc3\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n")
    assert (_raw(proc.url, head, body), _writer_or_none(proc)) == (401, writer)


# -- (d) idle connections are closed and do not shut others out -----------------------------


def test_idle_connections_are_closed_after_read_timeout(
        relay: Callable[..., RelayProcess]) -> None:
    """With 1000 idle connections open a normal POST still gets its 202, and the server closes
    the idle ones after server.read_timeout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    proc = relay(server={"read_timeout": "2s"})
    idle: list[socket.socket] = []
    try:
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", int(proc.url.rsplit(":", 1)[1])), 10)
            if i % 2:  # half of them send half a request and stop
                s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            idle.append(s)
        status, _, answer = http("POST", f"{proc.url}/v1/events",
                                 {"channel": "email", "status": "delivered", "message_id": "m"})
        assert status == 202, answer

        def all_closed() -> bool:
            return all(_closed_by_server(s) for s in idle)

        assert _wait(all_closed, 2 + 10), \
            f"{sum(not _closed_by_server(s) for s in idle)} idle connections still open"
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _closed_by_server(s: socket.socket) -> bool:
    """The server closed it, reset it, or answered it (a 408 counts: it dealt with it)."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


# -- (e) memory is bounded by bytes, not rows ----------------------------------------------


def _big_events(count: int) -> list[bytes]:
    """Valid events just under 1 MiB each: attributes a long list of small objects (strings
    longer than 64 characters, so the JSON parser's string cache does not share them)."""
    item = {"k": 1, "v": "x" * 70}
    items = [item] * ((MAX_BODY - 300) // (len(json.dumps(item)) + 2))
    template = json.dumps({"id": "big-000", "channel": "email", "status": "delivered",
                           "message_id": "m", "attributes": {"items": items}}).encode()
    assert len(template) <= MAX_BODY
    return [template.replace(b'"big-000"', b'"big-%03d"' % i, 1) for i in range(count)]


def test_big_pending_events_across_a_restart_stay_small(tmp_path: Path) -> None:
    """100 pending 1 MiB events, delivered after a restart, keep relay + writer under 200 MB."""
    with Receiver(default=Answer(delay=30)) as receiver:
        path = write_config(
            tmp_path, delivery={"allowed_ports": [receiver.port], "timeout": "60s"},
            destinations=[{"name": "braze", "format": "braze",
                           "url": f"{receiver.url}/braze"}])
        proc = RelayProcess(path, tmp_path / "relay.log").start()
        try:
            for body in _big_events(100):
                status, _, answer = http("POST", f"{proc.url}/v1/events", body, timeout=60)
                assert status == 202, answer
            proc.kill(signal.SIGKILL)
            before = len(receiver.received())
            receiver.set_default(Answer())
            proc.start(timeout=30)
            assert proc.proc is not None
            with PeakRss(proc.proc.pid) as rss:
                receiver.wait_for(before + 100, timeout=60)
                time.sleep(1.0)
            assert rss.peak < 200, f"relay + writer peaked at {rss.peak:.0f} MB"
        finally:
            proc.stop()
