"""Instructions per event, counted by valgrind's callgrind: the CPU-per-event figures of
bench/hotpath.py without the machine's noise.

CPU seconds from /proc move by 10-30 % between back-to-back runs on a shared machine, so a
change worth 5 % needs many alternating runs to see. Instructions executed do not depend on
what else the machine is doing: the same build gives the same count within a few per cent (the
spread is how requests happen to share event-loop turns and writer groups, which timing
still decides: compare the median of a few runs). Each server runs
under callgrind with instrumentation off until it is warm; it is switched on for a fixed load
and off again, per process (the relay and its writer apart), and each process's count is
divided by the events sent. Instructions are not time (a cache miss costs more than an add),
but a change that removes instructions from the hot path removes time with them.

- ingest: single events (wrk's event, bench/events.lua) on 16 keep-alive connections, to the
  bare server, the floor (bench/_floor.py, 3 delivery rows) and the relay (3 destinations
  behind an unreachable host, as bench/ingest.py);
- end to end: batches of 100 (8 senders, as bench/e2e.py) delivered to a fast receiver (not
  counted), through the forwarder, the floor and the relay (one braze destination).

Usage: python bench/instructions.py [--events 2000] [--only ingest|e2e]
(needs valgrind: apt-get install -y valgrind; about 3 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e
from _common import BENCH, PY, free_port, machine, process, process_tree, table
from ingest import DESTINATIONS

CONNECTIONS = 16
START_TIMEOUT = 300.0   # a relay starts in ~1 s, ~30x slower under valgrind
EVENT = ('{{"id":"{id}","channel":"email","status":"delivered","message_id":"m-{id}",'
         '"recipient":{{"email":"user@example.com"}},"attributes":{{"order_id":"42"}}}}')


async def single_events(port: int, prefix: str, total: int) -> None:
    """``total`` single events on CONNECTIONS keep-alive connections, each waiting for its
    202 before the next (raw HTTP/1.1: the client's own cost is not what is measured)."""
    async def one_connection(c: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(total // CONNECTIONS):
                body = EVENT.format(id=f"{prefix}-{c}-{i}").encode()
                writer.write(b"POST /v1/events HTTP/1.1\r\nHost: relay\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
                if not head.startswith(b"HTTP/1.1 202"):
                    raise RuntimeError(f"not accepted: {head[:200]!r}")
                size = re.search(rb"(?i)content-length: (\d+)", head)
                await reader.readexactly(int(size[1]) if size else 0)
        finally:
            writer.close()

    await asyncio.gather(*(one_connection(c) for c in range(CONNECTIONS)))


def _wait_for(port: int, proc: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited under valgrind:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not listen within {START_TIMEOUT:g}s under valgrind")


def _control(pids: list[int], *args: str) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, timeout=60)


def counted(command: list[str], port: int, workdir: Path,
            warm: Callable[[], Coroutine[Any, Any, Any]],
            load: Callable[[], Coroutine[Any, Any, Any]], events: int) -> list[float]:
    """Instructions per event of each process of ``command`` (the first its own, then its
    children's), counting only while ``load`` runs."""
    out = workdir / "callgrind"
    out.mkdir()
    log = workdir / "valgrind.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--trace-children=yes",
                                 "--instr-atstart=no", f"--callgrind-out-file={out}/%p.out",
                                 *command], cwd=workdir, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        _wait_for(port, proc, log)
        asyncio.run(warm())
        pids = process_tree(proc.pid)
        _control(pids, "-i", "on")
        asyncio.run(load())
        _control(pids, "-i", "off")
        _control(pids, "-d")
        return [_dumped(out, pid) / events for pid in pids]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _dumped(out: Path, pid: int, timeout: float = 60.0) -> int:
    """The instructions counted in ``pid``'s dump (valgrind writes it a moment after asked)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for dump in out.glob(f"{pid}.out.*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no counts for pid {pid} within {timeout:g}s")


def _relay_config(workdir: Path, port: int, destinations: list[dict[str, Any]],
                  delivery: dict[str, Any]) -> list[str]:
    config = {"server": {"listen": f"127.0.0.1:{port}", "log_level": "warning"},
              "spool": {"path": str(workdir / "spool.db")},
              "delivery": {"allowed_networks": ["127.0.0.0/8"], **delivery},
              "destinations": destinations}
    (workdir / "relay.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return [PY, "-m", "relay", "serve", "-c", str(workdir / "relay.yaml")]


def ingest(events: int) -> dict[str, list[float]]:
    found = {}
    for name in ("bare", "floor", "relay"):
        with tempfile.TemporaryDirectory() as tmp:
            workdir, port = Path(tmp), free_port()
            command = {
                "bare": [PY, str(BENCH / "_bare.py"), str(port)],
                "floor": [PY, str(BENCH / "_floor.py"), str(port), str(workdir / "floor.db"),
                          str(len(DESTINATIONS))],
                "relay": _relay_config(workdir, port, DESTINATIONS,
                                       {"allowed_ports": [80, 443, 9]}),
            }[name]
            tag = f"{name}{time.time()}"
            found[name] = counted(command, port, workdir,
                                  lambda p=port, t=tag: single_events(p, f"warm{t}", 400),
                                  lambda p=port, t=tag: single_events(p, t, events), events)
            print(f"  ingest, {name}: {sum(found[name]):,.0f} instructions per event",
                  file=sys.stderr, flush=True)
    return found


def end_to_end(events: int) -> dict[str, list[float]]:
    found = {}
    total = max(100, events // 100 * 100)
    with tempfile.TemporaryDirectory() as tmp:
        rport = free_port()
        with process([PY, str(BENCH / "_receiver.py"), str(rport)], rport,
                     Path(tmp) / "receiver.log"):
            target = f"http://127.0.0.1:{rport}/braze"
            for name in ("forwarder", "floor", "relay"):
                workdir, port = Path(tmp) / name, free_port()
                workdir.mkdir()
                command = {
                    "forwarder": [PY, str(BENCH / "_forwarder.py"), str(port), target],
                    "floor": [PY, str(BENCH / "_floor.py"), str(port),
                              str(workdir / "floor.db"), "1", target],
                    "relay": _relay_config(workdir, port,
                                           [{"name": "braze", "format": "braze", "url": target}],
                                           {"allowed_ports": [rport], "per_host_concurrency": 64}),
                }[name]
                tag = f"{name}{time.time()}"
                found[name] = counted(command, port, workdir,
                                      lambda p=port, t=tag: e2e.drive(p, rport, 500, f"warm{t}"),
                                      lambda p=port, t=tag: e2e.drive(p, rport, total, t),
                                      total)
                print(f"  end to end, {name}: {sum(found[name]):,.0f} instructions per event",
                      file=sys.stderr, flush=True)
    return found


def _row(label: str, counts: list[float], base: float) -> list[Any]:
    parts = " + ".join(f"{c / 1000:,.0f}k" for c in counts) if len(counts) > 1 else "-"
    return [label, f"{sum(counts) / 1000:,.0f}k", parts, f"{sum(counts) / base:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--only", choices=("ingest", "e2e"))
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench/instructions.py: skipped, it needs valgrind (apt-get install -y valgrind)")
        return
    events = max(CONNECTIONS, args.events // CONNECTIONS * CONNECTIONS)  # as many as are sent
    if args.only != "e2e":
        report(f"Ingest, {events:,} single events on {CONNECTIONS} connections", ingest(events),
               {"bare": "bare aiohttp+uvloop (the reference)",
                "floor": "floor: lean durable relay",
                "relay": "relay, SQLite spool, 3 destinations"},
               "(the CPU target is <= 1.6x)")
    if args.only != "ingest":
        report(f"End to end, {max(100, args.events // 100 * 100):,} events in batches of 100 "
               f"to a fast receiver (not counted)", end_to_end(args.events),
               {"forwarder": "minimal forwarder, not durable (the reference)",
                "floor": "floor: lean durable relay", "relay": "relay, SQLite spool, braze"},
               "")


def report(title: str, found: dict[str, list[float]], labels: dict[str, str],
           target: str) -> None:
    """One table: each server's instructions per event, against the first (the reference)."""
    reference, *_ = labels
    base = sum(found[reference])
    table(f"{title}, instructions per event (callgrind); {machine()}",
          ["server", "instructions per event", "by process (server + writer)",
           "x the reference"],
          [_row(label, found[name], base) for name, label in labels.items()])
    print(f"relay/{reference} {sum(found['relay']) / base:.2f} {target}".rstrip()
          + f"; floor/{reference} {sum(found['floor']) / base:.2f}")

if __name__ == "__main__":
    main()
