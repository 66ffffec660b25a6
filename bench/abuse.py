"""Abuse: what one misbehaving or merely unlucky client costs everybody else (issue 14).

Each scenario runs a fresh `relay serve` subprocess (temp config, temp spool) delivering to the
bench receiver (bench/_receiver.py) on 127.0.0.1, and a /healthz poller (every 10 ms, keep-alive)
that records the longest answer time ("stall") and the peak RSS of the relay plus its spool
writer (/proc). Scenarios, side by side in one table:

- invalid max-size batches `[{},{},...]`: one, then four at once (and a valid body of the same
  size for comparison), and one event of ~90,000 unknown fields, then 16 at once: stall, RSS
  growth, time to the answer;
- 100 valid ~1 MiB events with nested attributes: RSS while all are in flight to a slow
  receiver, and after they are delivered;
- delivered events/s end to end, without and with 8 clients scraping /metrics non-stop;
- p50/p99 of a normal sender (one event per POST, keep-alive) with 0 and with 1,000 idle
  connections open (half connect and send nothing, half send half a request header).

Every process is stopped by PID. Usage: python bench/abuse.py   (about 2 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH, PY, free_port, machine, process, relay, table
from e2e import drive

MAX_BODY = 1_048_576
IDLE = 1000
SCRAPERS = 8
RATE_EVENTS = 3000
PREFILL = 200_000  # rows in the activity log before the delivery runs


def progress(text: str) -> None:
    print(f"[abuse {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- measuring the relay from outside -------------------------------------------------------


def family(pid: int) -> list[int]:
    """The relay and its child processes (the spool writer)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *map(int, children)]


def rss_mb(pid: int) -> float:
    """Resident memory of the relay plus its spool writer, in MB."""
    total = 0
    for member in family(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Watch(threading.Thread):
    """Polls /healthz every 10 ms (``stall``: the longest answer, ms) while a second thread
    samples RSS every 10 ms (``peak_rss``), so a stalled relay is still measured."""

    def __init__(self, port: int, pid: int) -> None:
        super().__init__(daemon=True)
        self.port, self.pid = port, pid
        self.done = threading.Event()
        self.stall = 0.0
        self.peak_rss = self.base_rss = rss_mb(pid)
        self.failures = 0
        self.sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak_rss = max(self.peak_rss, rss_mb(self.pid))

    def run(self) -> None:
        self.sampler.start()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.done.is_set():
            start = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                self.failures += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            took = time.perf_counter() - start
            self.stall = max(self.stall, took * 1000)
            self.done.wait(max(0.0, 0.01 - took))
        conn.close()
        self.sampler.join(10)

    def __enter__(self) -> Watch:
        self.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(120)

    @property
    def growth(self) -> float:
        return self.peak_rss - self.base_rss


def post(port: int, path: str, body: bytes, timeout: float = 120) -> tuple[int, bytes, float]:
    """One POST on its own connection: (status, body, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), time.perf_counter() - start
    finally:
        conn.close()


def get_json(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.05)


@contextmanager
def receiver(tmpdir: Path) -> Iterator[int]:
    port = free_port()
    with process([PY, str(BENCH / "_receiver.py"), str(port)], port, tmpdir / "recv.log"):
        yield port


def set_receiver(port: int, **mode: float) -> None:
    query = "&".join(f"{k}={v}" for k, v in mode.items())
    post(port, f"/mode?{query}", b"")


def received(port: int) -> int:
    return get_json(port, "/count")["count"]


def relay_config(tmpdir: Path, rport: int, name: str, **delivery: Any) -> dict[str, Any]:
    return {"spool": {"path": str(tmpdir / f"{name}.db")},
            "delivery": {"allowed_ports": [rport], "allowed_networks": ["127.0.0.0/8"], **delivery},
            "destinations": [{"name": "braze", "format": "braze",
                              "url": f"http://127.0.0.1:{rport}/braze"}]}


# -- bodies ---------------------------------------------------------------------------------


def empty_objects_batch() -> bytes:
    """`[{},{},...]` as long as server.max_body_bytes allows (each element: 3 bytes)."""
    count = (MAX_BODY - 1) // 3
    return b"[" + b"{}," * (count - 1) + b"{}]"


def unknown_fields_event() -> bytes:
    """One event object of nothing but unknown fields, as many as server.max_body_bytes allows
    (~90,000): each is an error of its own."""
    count = (MAX_BODY - 2) // 12   # (each: "k000000":1 and a comma)
    return b"{" + b",".join(b'"k%06d":1' % i for i in range(count)) + b"}"


def valid_batch_same_size() -> bytes:
    """500 valid events (server.max_batch) padded to the same size as the invalid batch."""
    pad = (MAX_BODY - 500 * 120) // 500
    body = json.dumps([{"id": f"same-{i}", "channel": "email", "status": "delivered",
                        "message_id": f"m-{i}", "attributes": {"pad": "x" * pad}}
                       for i in range(500)]).encode()
    assert len(body) <= MAX_BODY, len(body)
    return body


def big_event(i: int) -> bytes:
    """One valid event just under 1 MiB, its attributes a long list of small objects."""
    item = {"k": 12345, "v": "x"}
    per_item = len(json.dumps(item)) + 2
    items = [item] * ((MAX_BODY - 300) // per_item)
    body = json.dumps({"id": f"big-{i}", "channel": "email", "status": "delivered",
                       "message_id": f"m-{i}", "attributes": {"items": items}}).encode()
    assert len(body) <= MAX_BODY, len(body)
    return body


# -- scenarios ------------------------------------------------------------------------------


def invalid_batches(tmpdir: Path, rport: int) -> list[tuple[Any, ...]]:
    rows = []
    invalid, valid, unknown = empty_objects_batch(), valid_batch_same_size(), \
        unknown_fields_event()
    progress(f"invalid batches: {len(invalid):,} bytes, {(len(invalid) - 1) // 3:,} empty objects")
    for label, body, copies in (("valid 1 MiB batch (500 events), for comparison", valid, 1),
                                ("1 invalid max-size batch [{},{},...]", invalid, 1),
                                ("4 invalid max-size batches at once", invalid, 4),
                                ("1 event of ~90,000 unknown fields (1 MiB)", unknown, 1),
                                ("16 such events at once", unknown, 16)):
        with relay(relay_config(tmpdir, rport, f"invalid{copies}{len(rows)}"), tmpdir) \
                as (proc, port):
            time.sleep(0.5)
            with Watch(port, proc.pid) as watch:
                answers = concurrently([lambda body=body: post(port, "/v1/events", body)]
                                       * copies)
                time.sleep(0.2)
            statuses = sorted({status for status, _, _ in answers})
            details = json.loads(answers[0][1]).get("details", [])
            rows.append((label, watch.stall, watch.growth,
                         max(seconds for _, _, seconds in answers) * 1000,
                         "/".join(map(str, statuses)) + (f", {len(details)} details"
                                                         if details else "")))
        progress(f"  {label}: stall {watch.stall:,.0f} ms, RSS +{watch.growth:,.0f} MB")
    return rows


def big_events(tmpdir: Path, rport: int) -> list[tuple[Any, ...]]:
    bodies = [big_event(i) for i in range(100)]
    progress(f"100 valid events of {len(bodies[0]):,} bytes to a slow receiver")
    set_receiver(rport, delay=8)
    base = received(rport)
    config = relay_config(tmpdir, rport, "big", concurrency=128, per_host_concurrency=128,
                          timeout="60s")
    try:
        with relay(config, tmpdir) as (proc, port):
            time.sleep(0.5)
            with Watch(port, proc.pid) as watch:
                answers = concurrently([
                    (lambda part=part: [post(port, "/v1/events", b)[0] for b in part])
                    for part in (bodies[k::4] for k in range(4))])
                statuses = sorted({s for part in answers for s in part})
                # The relay sends as many at once as its in-flight byte budget allows (8 MiB
                # of events, not all 100): wait until the receiver holds some, all accepted.
                eventually(lambda: received(rport) - base >= 4, 60, "the first in flight")
                time.sleep(2.0)
                in_flight = rss_mb(proc.pid)
                set_receiver(rport, delay=0)
                eventually(lambda: not get_json(port, "/v1/deliveries?status=pending&limit=1")
                           ["deliveries"], 120, "all 100 delivered")
                time.sleep(1.0)
                after = rss_mb(proc.pid)
            rows = [("100 x 1 MiB events pending, sending (receiver slow)", watch.stall,
                     in_flight - watch.base_rss, None, f"{in_flight:,.0f} MB resident"),
                    ("  ... after all 100 are delivered", None, after - watch.base_rss, None,
                     f"{after:,.0f} MB resident, peak {watch.peak_rss:,.0f} MB; "
                     f"ingest {'/'.join(map(str, statuses))}")]
    finally:
        set_receiver(rport, delay=0)
    progress(f"  in flight {in_flight:,.0f} MB, after delivery {after:,.0f} MB")
    return rows


async def prefill(port: int, total: int) -> float:
    """``total`` `delayed` events, which braze cannot express: each leaves one `skipped`
    delivery row (the activity log of a relay that has run a while) and sends nothing."""
    import aiohttp

    start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        async def sender(first: int) -> None:
            for b in range(first, total // 500, 4):
                batch = [{"id": f"old-{b}-{i}", "channel": "email", "status": "delayed",
                          "message_id": f"m-{b}-{i}"} for i in range(500)]
                async with session.post(f"http://127.0.0.1:{port}/v1/events", json=batch) as r:
                    assert r.status == 202, await r.text()
        await asyncio.gather(*(sender(k) for k in range(4)))
    return total / (time.perf_counter() - start)


def metrics_scraping(tmpdir: Path, rport: int) -> tuple[list[tuple[Any, ...]], float]:
    progress(f"delivery rate, {RATE_EVENTS:,} events, without and with {SCRAPERS} /metrics "
             f"scrapers; first {PREFILL:,} older deliveries in the activity log")
    config = relay_config(tmpdir, rport, "rate", per_host_concurrency=64)
    with relay(config, tmpdir) as (proc, port):
        rate = asyncio.run(prefill(port, PREFILL))
        progress(f"  prefilled at {rate:,.0f} events/s")
        asyncio.run(drive(port, rport, 1000, "warm"))
        with Watch(port, proc.pid) as quiet:
            alone = asyncio.run(drive(port, rport, RATE_EVENTS, f"alone{time.time()}"))
        progress(f"  alone: {alone['events_s']:,.0f} events/s")
        scraper = subprocess.Popen([PY, __file__, "--scrape", str(port)],
                                   stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)
            with Watch(port, proc.pid) as noisy:
                scraped = asyncio.run(drive(port, rport, RATE_EVENTS, f"scraped{time.time()}"))
        finally:
            scraper.send_signal(signal.SIGTERM)
            out, _ = scraper.communicate(timeout=30)
        scrapes = json.loads(out or "{}")
    progress(f"  with scrapers: {scraped['events_s']:,.0f} events/s")
    ratio = scraped["events_s"] / alone["events_s"]
    rows = [("delivery, nobody scraping", quiet.stall, None, None,
             f"{alone['events_s']:,.0f} delivered/s"),
            (f"delivery, {SCRAPERS} clients scraping /metrics", noisy.stall, None, None,
             f"{scraped['events_s']:,.0f} delivered/s ({ratio:.2f} of alone); "
             f"{scrapes.get('per_s', 0):,.0f} scrapes/s")]
    return rows, ratio


def normal_sender(port: int, count: int, tag: str, keep_alive: bool) -> tuple[float, float]:
    """p50 and p99 ms of ``count`` single-event POSTs, on one keep-alive connection or on a new
    connection each (the connect is part of the time)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for i in range(count):
        body = json.dumps({"id": f"{tag}-{i}", "channel": "email", "status": "delivered",
                           "message_id": f"m-{i}"}).encode()
        start = time.perf_counter()
        if not keep_alive:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/events", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        times.append(time.perf_counter() - start)
        assert resp.status == 202, resp.status
        if not keep_alive:
            conn.close()
    conn.close()
    times.sort()
    return times[len(times) // 2] * 1000, times[int(len(times) * 0.99)] * 1000


def open_idle(port: int, count: int) -> list[socket.socket]:
    """Half connect and send nothing; half send half a request header and stop."""
    sockets = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        sockets.append(s)
    return sockets


def still_open(sockets: list[socket.socket]) -> int:
    """How many the server has neither closed nor answered (an answer, such as a 408, counts
    as the server dealing with it)."""
    alive = 0
    for s in sockets:
        s.setblocking(False)
        try:
            s.recv(1)
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def idle_connections(tmpdir: Path, rport: int) -> list[tuple[Any, ...]]:
    progress(f"normal sender latency with 0 and {IDLE:,} idle connections")
    rows = []
    with relay(relay_config(tmpdir, rport, "idle"), tmpdir) as (proc, port):
        normal_sender(port, 100, "warm", keep_alive=True)

        def measure(label: str, tag: str) -> tuple[Watch, str]:
            with Watch(port, proc.pid) as watch:
                kept = normal_sender(port, 400, f"{tag}-k", keep_alive=True)
                fresh = normal_sender(port, 400, f"{tag}-n", keep_alive=False)
            result = (f"keep-alive p50 {kept[0]:.2f} / p99 {kept[1]:.2f} ms; new connection "
                      f"each p50 {fresh[0]:.2f} / p99 {fresh[1]:.2f} ms")
            progress(f"  {label}: {result}")
            return watch, result

        watch, result = measure("no idle connections", "alone")
        rows.append(("normal sender, no idle connections", watch.stall, None, None, result))
        idle = open_idle(port, IDLE)
        opened = time.monotonic()
        try:
            time.sleep(0.5)
            watch, result = measure(f"{IDLE} idle connections", "idle")
            time.sleep(max(0.0, 5.0 - (time.monotonic() - opened)))
            alive = still_open(idle)
            held = time.monotonic() - opened
        finally:
            for s in idle:
                s.close()
        rows.append((f"normal sender, {IDLE:,} idle connections open", watch.stall,
                     watch.growth, None,
                     f"{result}; {alive:,} of {IDLE:,} idle still open after {held:.0f}s"))
        progress(f"  {alive} of {IDLE} idle connections still open after {held:.0f}s")
    rows.append(fd_starved(tmpdir, rport))
    return rows


def fd_starved(tmpdir: Path, rport: int) -> tuple[Any, ...]:
    """1,100 idle connections against a relay started with the common default of 1,024 open
    files (RLIMIT_NOFILE): can a new sender still get an answer?"""
    tries, answered, count = 5, 0, IDLE + 100
    statuses: list[int] = []
    with ExitStack() as stack:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        try:
            proc, port = stack.enter_context(
                relay(relay_config(tmpdir, rport, "fds"), tmpdir))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        idle = open_idle(port, count)
        try:
            time.sleep(0.5)
            fds = len(list(Path(f"/proc/{proc.pid}/fd").iterdir()))
            for i in range(tries):
                try:
                    status, _, _ = post(port, "/v1/events", json.dumps(
                        {"id": f"fd-{i}", "channel": "email", "status": "delivered",
                         "message_id": "m"}).encode(), timeout=2)
                    answered += 1
                    statuses.append(status)
                except OSError:
                    pass
        finally:
            for s in idle:
                s.close()
    progress(f"  relay at nofile 1024 with {count} idle: {answered} of {tries} new senders "
             f"answered ({fds} fds open)")
    return (f"new sender, {count:,} idle, relay at nofile 1024", None, None, None,
            f"{answered} of {tries} POSTs answered within 2 s (statuses "
            f"{'/'.join(map(str, sorted(set(statuses)))) or '-'}: 503 is server.max_connections "
            f"reached); relay had {fds:,} fds open")


# -- the /metrics scraper (a separate process, so it does not share our GIL) ----------------


async def scrape(port: int, clients: int) -> None:
    import aiohttp

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    count = 0
    started = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal count
        while not stop.is_set():
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                await resp.read()
            count += 1

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        await stop.wait()
        await asyncio.wait(tasks, timeout=30)
    print(json.dumps({"scrapes": count, "per_s": count / (time.perf_counter() - started)}))


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scrape", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("invalid", "big", "metrics", "idle"),
                        help="run one scenario")
    args = parser.parse_args()
    if args.scrape:
        asyncio.run(scrape(args.scrape, SCRAPERS))
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 500:  # our idle sockets; the relay (a child) inherits the raised limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * IDLE)), hard))
    started = time.monotonic()
    rows: list[tuple[Any, ...]] = []
    ratio = None
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        with receiver(tmpdir) as rport:
            if args.only in (None, "invalid"):
                rows += invalid_batches(tmpdir, rport)
            if args.only in (None, "big"):
                rows += big_events(tmpdir, rport)
            if args.only in (None, "metrics"):
                scraped, ratio = metrics_scraping(tmpdir, rport)
                rows += scraped
            if args.only in (None, "idle"):
                rows += idle_connections(tmpdir, rport)
    table(f"Abuse: healthz stall (max answer time, polled every 10 ms) and relay+writer RSS "
          f"growth per scenario; {machine()}",
          ["scenario", "healthz stall ms", "RSS growth MB", "answer ms", "result"],
          [tuple("-" if cell is None else cell for cell in row) for row in rows])
    if ratio is not None:
        print(f"\ndelivery with {SCRAPERS} /metrics scrapers / without: {ratio:.2f}")
    print(f"whole run: {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
