"""Ingest throughput and latency of the real relay, against a bare aiohttp+uvloop ceiling.

Runs on loopback only: wrk (1 thread) posts unique events to a bare server that parses the JSON
and answers 202 without validating or storing, then to a relay subprocess on a fresh spool, then
to the floor (bench/_floor.py: the same stack answering 202 only once the event and its 3
delivery rows are committed to SQLite, and doing nothing else).
Usage: python bench/ingest.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    backends_arg,
    bare_server,
    busy_line,
    floor_server,
    load,
    machine,
    occupancy,
    relay,
    spools,
    table,
)


def measured(pid: int, port: int, **kwargs: object) -> dict[str, float]:
    """One load run, with the CPU the server's processes spent per 1,000 events and how busy
    its event loop, the rest of it and wrk were (``busy_*``, shares of one core)."""
    with occupancy(pid) as busy:
        result = load(port, **kwargs)  # type: ignore[arg-type]
    result["cpu_s_per_1k"] = busy.pop("cpu") * 1000 / max(1, result["events"])
    result.update({f"busy_{key}": value for key, value in busy.items()})
    return result

DESTINATIONS = [  # one of each format, as in config.example.yaml (nothing is delivered here)
    {"name": "ajo", "format": "ajo", "url": "http://127.0.0.1:9/ajo", "allow_insecure_http": True,
     "ajo": {"ims_org": "org", "sandbox": {"id": "sb", "name": "prod"}}},
    {"name": "braze", "format": "braze", "url": "http://127.0.0.1:9/braze"},
    {"name": "crm", "format": "template", "url": "http://127.0.0.1:9/crm",
     "template": {"method": "POST", "body": {"type": "json", "fields": {"s": "{{ event.status }}"}}}},
]


RUNS = (("single", 1, 64), ("batch of 100", 100, 16))


def run(seconds: float, backend: str) -> dict[tuple[str, str], dict[str, float]]:
    """Every row of the table: (server, mode) -> figures; server is "bare" or a backend."""
    results: dict[tuple[str, str], dict[str, float]] = {}
    tag = str(int(time.time()))
    with bare_server() as (bare, port):
        load(port, batch=1, connections=64, seconds=2, prefix="warm")
        for mode, batch, conns in RUNS:
            results["bare", mode] = measured(bare.pid, port, batch=batch, connections=conns,
                                             seconds=seconds, prefix=f"bare{tag}")
    with tempfile.TemporaryDirectory() as tmp, spools(backend, Path(tmp)) as backends:
        for name, spool in backends:
            config = {"spool": spool,
                      "delivery": {"allowed_ports": [80, 443, 9],
                                   "allowed_networks": ["127.0.0.0/8"]},
                      "destinations": DESTINATIONS}
            with relay(config, Path(tmp)) as (proc, port):
                load(port, batch=1, connections=64, seconds=2, prefix=f"warm{name}{tag}")
                for mode, batch, conns in RUNS:
                    results[name, mode] = measured(proc.pid, port, batch=batch,
                                                   connections=conns, seconds=seconds,
                                                   prefix=f"{name}{tag}")
    # Last, so the relay is measured after the same runs as before the floor existed.
    with floor_server(len(DESTINATIONS)) as (floor, port):
        load(port, batch=1, connections=64, seconds=2, prefix=f"warmfloor{tag}")
        for mode, batch, conns in RUNS:
            results["floor", mode] = measured(floor.pid, port, batch=batch, connections=conns,
                                              seconds=seconds, prefix=f"floor{tag}")
    return results


def report(results: dict[tuple[str, str], dict[str, float]], seconds: float) -> None:
    conns = {mode: c for mode, _, c in RUNS}
    labels = {"bare": "bare aiohttp+uvloop (parses JSON)",
              "floor": "floor: lean durable relay (bench/_floor.py)",
              "sqlite": "relay, sqlite spool",
              "postgres": "relay, postgres spool"}
    rows = [(labels[server], mode, conns[mode], *_cols(r))
            for (server, mode), r in results.items()]
    table(f"Ingest, {seconds:.0f}s per row; load: wrk -t1 (Lua, unique ids); {machine()}",
          ["server", "mode", "conns", "req/s", "events/s", "p50 ms", "p99 ms", "errors",
           "CPU s/1k ev"], rows)
    print("\nrelay = validate + fan-out to 3 destinations + a group-committed durable spool "
          "(SQLite: WAL, fsync per commit, in the relay's writer process; PostgreSQL: one "
          "transaction per group, on this machine) before the 202; CPU = every process of the "
          "server (the relay, its writer), from /proc")
    print("\nSingle events, how busy each part was (shares of one core; an event loop under "
          "100 % with requests waiting is waiting for its writer's answers, unless the parts "
          "fill the cores" + ("; PostgreSQL's server is not in them" if
                              ("postgres", "single") in results else "") + "):")
    for server in ("bare", "sqlite", "postgres", "floor"):
        if (server, "single") in results:
            print("  " + busy_line(labels[server], _shares(results[server, "single"])))
    bare, floor = results["bare", "single"], results.get(("floor", "single"))
    if floor is not None:
        print(f"floor/bare, single events: throughput {floor['req_s'] / bare['req_s']:.2f}, p99 "
              f"{floor['p99_ms'] / bare['p99_ms']:.1f}x, CPU per event "
              f"{floor['cpu_s_per_1k'] / bare['cpu_s_per_1k']:.1f}x (what durability alone "
              f"costs on this stack)")
    for backend in (b for b in ("sqlite", "postgres") if (b, "single") in results):
        single = results[backend, "single"]["req_s"] / results["bare", "single"]["req_s"]
        p99 = results[backend, "single"]["p99_ms"] / results["bare", "single"]["p99_ms"]
        cpu = results[backend, "single"]["cpu_s_per_1k"] / results["bare", "single"]["cpu_s_per_1k"]
        print(f"{backend}: single events relay/bare throughput {single:.2f} (target >= 0.60), "
              f"p99 relay/bare {p99:.1f}x (target <= 2x), CPU per event relay/bare {cpu:.1f}x "
              f"(target <= 1.6x); batches of 100 "
              f"{results[backend, 'batch of 100']['events_s']:,.0f} events/s")
    if ("sqlite", "single") in results and ("postgres", "single") in results:
        for mode, target in (("single", "single-event postgres >= 0.5 of sqlite"),
                             ("batch of 100", "batches >= 20,000 events/s on postgres")):
            ratio = results["postgres", mode]["events_s"] / results["sqlite", mode]["events_s"]
            print(f"postgres/sqlite, {mode}: {ratio:.2f} ({target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    backends_arg(parser)
    args = parser.parse_args()
    report(run(args.seconds, args.backend), args.seconds)


def _shares(r: dict[str, float]) -> dict[str, float]:
    return {key: r[f"busy_{key}"] for key in ("loop", "rest", "load")}


def _cols(r: dict[str, float]) -> tuple[object, ...]:
    return (r["req_s"], r["events_s"], r["p50_ms"], r["p99_ms"], int(r["errors"]),
            f"{r['cpu_s_per_1k']:.3f}")


if __name__ == "__main__":
    main()
