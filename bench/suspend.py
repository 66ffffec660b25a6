"""A backlog behind a suspended host: memory and CPU while it waits, what it costs the other
destinations' deliveries meanwhile, drain rate after recovery.

A receiver answers 503; the relay trips the host after 10 failures and suspends it. We post
100,000 events (to that destination alone), measure the relay's memory and CPU for a while as
it holds them, then post single events to another destination on a healthy receiver at
``--live-rate`` a second (bounced ones: the dead destination takes delivered ones only), with
the relay's CPU per live event and their ingest-to-receiver latency (bench/_latency_receiver.py,
CLOCK_MONOTONIC on both sides). Then it turns the first receiver to 200 and measures how fast the
backlog drains after the probe succeeds.
On PostgreSQL the database server's CPU per live event is shown too (its looks run there).
Usage: python bench/suspend.py [--events 100000] [--wait 10] [--live-rate 200]
                               [--workers 1] [--backend sqlite|postgres|both]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH, PY, backends_arg, free_port, machine, process, relay, spools, table
from _common import cpu_seconds as cpu_of_tree


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def post(url: str, body: bytes = b"", ctype: str = "application/json") -> dict:
    request = urllib.request.Request(url, body, {"Content-Type": ctype}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


def family(pid: int) -> list[int]:
    """The relay and its child processes (the spool writer)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def memory(pid: int) -> str:
    """RSS of the relay and of its spool writer, and their PSS together (PSS splits the pages
    the two processes share, such as the Python binary, instead of counting them twice)."""
    rss, pss = [], 0
    for member in family(pid):
        for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss.append(int(line.split()[1]) / 1024)
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return f"{' + '.join(f'{r:.0f}' for r in rss)} MB RSS; {pss / 1024:.0f} MB PSS"


def host_of(hosts: dict, port: int) -> dict:
    """The /v1/hosts entry of the receiver on ``port``."""
    (host,) = [h for h in hosts["hosts"] if h["host"].endswith(f":{port}")]
    return host


def live_traffic(base: str, rate: float, seconds: float) -> tuple[list[int], int]:
    """Post single bounced events at ``rate`` a second for ``seconds``, each on its schedule
    (a POST late by more than 2 ms is counted): their POST start times (monotonic ns) by
    index, and how many started late."""
    started, late = [], 0
    t0 = time.monotonic()
    for i in range(int(rate * seconds)):
        at = t0 + i / rate
        wait = at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elif wait < -0.002:
            late += 1
        started.append(time.monotonic_ns())
        post(f"{base}/v1/events", json.dumps({
            "id": f"live{i}", "channel": "email", "status": "bounced",
            "message_id": f"live{i}", "recipient": {"email": "a@example.com"}}).encode())
    return started, late


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[max(0, min(len(values) - 1, round(p / 100 * len(values)) - 1))]


def run(spool: dict, args: argparse.Namespace, tmpdir: Path, db_pid: int | None
        ) -> list[str]:
    """One relay on ``spool`` through the whole story; its column of the table."""
    suspend = 2 * args.wait + 30  # long enough to cover ingest and both measurements
    rport, lport = free_port(), free_port()

    def db_cpu() -> float:
        return cpu_of_tree(db_pid) if db_pid is not None else 0.0

    with process([PY, str(BENCH / "_receiver.py"), str(rport), "503"], rport,
                 tmpdir / "recv.log"), \
            process([PY, str(BENCH / "_latency_receiver.py"), str(lport)], lport,
                    tmpdir / "live.log"):
        config = {"spool": spool, "server": {"workers": args.workers},
                  "delivery": {"allowed_ports": [rport, lport], "backoff_initial": "1s",
                               "backoff_max": "5s", "allowed_networks": ["127.0.0.0/8"]},
                  "health": {"consecutive_failures": 10, "suspend_for": f"{suspend:.0f}s",
                             "suspend_max": f"{suspend:.0f}s"},
                  "destinations": [{"name": "braze", "format": "braze",
                                    "statuses": ["delivered"],
                                    "url": f"http://127.0.0.1:{rport}/braze"},
                                   {"name": "live", "format": "braze",
                                    "statuses": ["bounced"],
                                    "url": f"http://127.0.0.1:{lport}/live"}]}
        with relay(config, tmpdir) as (proc, port):
            base = f"http://127.0.0.1:{port}"
            idle_mem = memory(proc.pid)
            t0 = time.perf_counter()
            for start in range(0, args.events, 500):
                batch = [{"id": f"e{i}", "channel": "email", "status": "delivered",
                          "message_id": f"m{i}"} for i in range(start, start + 500)]
                post(f"{base}/v1/events", json.dumps(batch).encode())
            ingest_s = time.perf_counter() - t0
            host = host_of(get(f"{base}/v1/hosts"), rport)
            assert host["state"] == "suspended", host
            time.sleep(1.0)
            cpu0, w0 = cpu_of_tree(proc.pid), time.perf_counter()
            time.sleep(args.wait)
            cpu_pct = (cpu_of_tree(proc.pid) - cpu0) / (time.perf_counter() - w0) * 100
            held_mem = memory(proc.pid)
            queued = host_of(get(f"{base}/v1/hosts"), rport)["queued"]
            cpu0, db0 = cpu_of_tree(proc.pid), db_cpu()
            started, late = live_traffic(base, args.live_rate, args.wait)
            deadline = time.time() + 30
            while get(f"http://127.0.0.1:{lport}/count")["count"] < len(started) and \
                    time.time() < deadline:
                time.sleep(0.05)
            live_cpu = (cpu_of_tree(proc.pid) - cpu0) / len(started) * 1e3
            live_db = (db_cpu() - db0) / len(started) * 1e3
            arrivals = get(f"http://127.0.0.1:{lport}/arrivals")["arrivals"]
            waits = [(arrivals[f"live{i}"] - at) / 1e6 for i, at in enumerate(started)
                     if f"live{i}" in arrivals]
            assert host_of(get(f"{base}/v1/hosts"), rport)["state"] == "suspended", \
                "the host's suspension ended during the live traffic: raise suspend_for"
            post(f"http://127.0.0.1:{rport}/mode?status=200")
            deadline = time.time() + suspend + 600
            while get(f"http://127.0.0.1:{rport}/count")["ok"] < args.events:
                if time.time() > deadline:
                    raise SystemExit("the backlog did not drain in time")
                time.sleep(0.2)
            stats = get(f"http://127.0.0.1:{rport}/count")
            drain_s = stats["last_ok"] - stats["first_ok"]
            drained_mem = memory(proc.pid)
    return [
        idle_mem, f"{ingest_s:.1f} s", f"{queued:,}", held_mem, f"{cpu_pct:.1f} %",
        f"{live_cpu:.2f} ms" + (f" (+ database {live_db:.2f} ms)" if db_pid is not None else ""),
        f"{percentile(waits, 50):.1f} / {percentile(waits, 99):.1f} / {max(waits):.1f} ms"
        if waits else "none arrived",
        f"{len(waits):,} / {late}",
        f"{args.events / drain_s:,.0f} deliveries/s", drained_mem,
        f"{stats['count'] - stats['ok']:,}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--wait", type=float, default=10.0, help="seconds measured while held")
    parser.add_argument("--live-rate", type=float, default=200.0,
                        help="events a second to the healthy destination meanwhile")
    parser.add_argument("--workers", type=int, default=1, help="server.workers")
    backends_arg(parser)
    args = parser.parse_args()
    columns: list[tuple[str, list[str]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        servers: list = []
        with spools(args.backend, Path(tmp), servers) as found:
            for name, spool in found:
                print(f"{name}: {args.events:,} events behind a suspended host ...",
                      file=sys.stderr, flush=True)
                workdir = Path(tmp) / name
                workdir.mkdir()
                pid = servers[0].pid if name == "postgres" else None
                columns.append((name, run(spool, args, workdir, pid)))
    measures = [
        ("memory idle (relay + spool writer)", "< 80 MB"),
        (f"ingest of {args.events:,} events (batches of 500)", ""),
        ("queued behind the suspended host", ""),
        ("memory holding them", "< 150 MB"),
        (f"CPU while holding them ({args.wait:.0f} s)", "~0 %"),
        (f"meanwhile, {int(args.live_rate * args.wait):,} events to a healthy destination "
         f"({args.live_rate:.0f}/s): relay CPU per event", ""),
        ("  their ingest-to-receiver latency p50 / p99 / max", ""),
        ("  delivered / POSTs started late (> 2 ms)", ""),
        ("drain after the probe succeeded", ""),
        ("memory after draining", ""),
        ("requests the receiver saw while failing", ""),
    ]
    rows = [(label, *(values[i] for _, values in columns), target)
            for i, (label, target) in enumerate(measures)]
    table(f"Backlog behind a suspended host; {machine()}",
          ["measure", *(name for name, _ in columns), "target"], rows)


if __name__ == "__main__":
    main()
