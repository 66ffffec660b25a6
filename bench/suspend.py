"""A backlog behind a suspended host: memory and CPU while it waits, drain rate after recovery.

A receiver answers 503; the relay trips the host after 10 failures and suspends it. We post
100,000 events (one destination), measure the relay's memory and CPU for a while as it holds them,
then turn the receiver to 200 and measure how fast the backlog drains after the probe succeeds.
Usage: python bench/suspend.py [--events 100000] [--wait 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH, PY, free_port, machine, process, relay, table


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


def cpu_seconds(pid: int) -> float:
    total = 0
    for member in family(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--wait", type=float, default=10.0, help="seconds measured while held")
    args = parser.parse_args()
    suspend = args.wait + 20  # long enough to cover ingest and the measurement
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        rport = free_port()
        with process([PY, str(BENCH / "_receiver.py"), str(rport), "503"], rport,
                     tmpdir / "recv.log"):
            config = {"spool": {"path": str(tmpdir / "spool.db")},
                      "delivery": {"allowed_ports": [rport], "backoff_initial": "1s",
                                   "backoff_max": "5s", "allowed_networks": ["127.0.0.0/8"]},
                      "health": {"consecutive_failures": 10, "suspend_for": f"{suspend:.0f}s",
                                 "suspend_max": f"{suspend:.0f}s"},
                      "destinations": [{"name": "braze", "format": "braze",
                                        "url": f"http://127.0.0.1:{rport}/braze"}]}
            with relay(config, tmpdir) as (proc, port):
                base = f"http://127.0.0.1:{port}"
                idle_mem = memory(proc.pid)
                t0 = time.perf_counter()
                for start in range(0, args.events, 500):
                    batch = [{"id": f"e{i}", "channel": "email", "status": "delivered",
                              "message_id": f"m{i}"} for i in range(start, start + 500)]
                    post(f"{base}/v1/events", json.dumps(batch).encode())
                ingest_s = time.perf_counter() - t0
                host = get(f"{base}/v1/hosts")["hosts"][0]
                assert host["state"] == "suspended", host
                time.sleep(1.0)
                cpu0, w0 = cpu_seconds(proc.pid), time.perf_counter()
                time.sleep(args.wait)
                cpu_pct = (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - w0) * 100
                held_mem = memory(proc.pid)
                queued = get(f"{base}/v1/hosts")["hosts"][0]["queued"]
                post(f"http://127.0.0.1:{rport}/mode?status=200")
                deadline = time.time() + suspend + 600
                while get(f"http://127.0.0.1:{rport}/count")["ok"] < args.events:
                    if time.time() > deadline:
                        raise SystemExit("the backlog did not drain in time")
                    time.sleep(0.2)
                stats = get(f"http://127.0.0.1:{rport}/count")
                drain_s = stats["last_ok"] - stats["first_ok"]
                drained_mem = memory(proc.pid)
    rows = [
        ("memory idle (relay + spool writer)", idle_mem, "< 80 MB"),
        (f"ingest of {args.events:,} events (batches of 500)", f"{ingest_s:.1f} s", ""),
        ("queued behind the suspended host", f"{queued:,}", ""),
        ("memory holding them", held_mem, "< 150 MB"),
        (f"CPU while holding them ({args.wait:.0f} s)", f"{cpu_pct:.1f} %", "~0 %"),
        ("drain after the probe succeeded", f"{args.events / drain_s:,.0f} deliveries/s",
         ""),
        ("memory after draining", drained_mem, ""),
    ]
    table(f"Backlog behind a suspended host; {machine()}", ["measure", "value", "target"], rows)
    print(f"\nrequests the receiver saw while failing: {stats['count'] - stats['ok']:,}")


if __name__ == "__main__":
    main()
