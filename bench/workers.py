"""server.workers: ingest with 1 worker against 2 (or more), in the same run, same load.

wrk (1 thread) posts unique single events (64 connections) and batches of 100 (16
connections) to a relay on a fresh spool, once per worker count. CPU is every process of the
relay (supervisor, workers, writer), from /proc. On a machine with 2 cores, wrk, the writer
and the workers share them: the figure to read is the ratio, and whether it is above 1.
Usage: python bench/workers.py [--seconds 10] [--workers 1,2] [--backend sqlite|postgres|both]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import backends_arg, load, machine, relay, spools, table
from ingest import DESTINATIONS, measured

RUNS = (("single", 1, 64), ("batch of 100", 100, 16))


def run(seconds: float, backend: str, counts: list[int]) -> dict[tuple[str, int, str], dict[str, float]]:
    """(backend, workers, mode) -> figures."""
    results: dict[tuple[str, int, str], dict[str, float]] = {}
    tag = str(int(time.time()))
    for workers in counts:
        with tempfile.TemporaryDirectory() as tmp, spools(backend, Path(tmp)) as backends:
            for name, spool in backends:
                config = {"server": {"workers": workers}, "spool": spool,
                          "delivery": {"allowed_ports": [80, 443, 9],
                                       "allowed_networks": ["127.0.0.0/8"]},
                          "destinations": DESTINATIONS}
                with relay(config, Path(tmp)) as (proc, port):
                    time.sleep(1.0 + 0.2 * workers)   # every worker listening
                    load(port, batch=1, connections=64, seconds=2, prefix=f"warm{name}{workers}{tag}")
                    for mode, batch, conns in RUNS:
                        results[name, workers, mode] = measured(
                            proc.pid, port, batch=batch, connections=conns, seconds=seconds,
                            prefix=f"{name}{workers}{tag}")
                        print(f"  {name}, {workers} worker(s), {mode}: "
                              f"{results[name, workers, mode]['events_s']:,.0f} events/s",
                              file=sys.stderr, flush=True)
    return results


def report(results: dict[tuple[str, int, str], dict[str, float]], seconds: float) -> None:
    rows = [(backend, workers, mode, r["events_s"], r["p50_ms"], r["p99_ms"], int(r["errors"]),
             f"{r['cpu_s_per_1k']:.3f}", f"{r['cpu_s_per_1k'] * r['events_s'] / 1000:.2f}")
            for (backend, workers, mode), r in results.items()]
    table(f"server.workers, {seconds:.0f}s per row; wrk -t1; {machine()}",
          ["spool", "workers", "mode", "events/s", "p50 ms", "p99 ms", "errors",
           "CPU s/1k ev", "cores used"], rows)
    print(f"\ncores used = the relay's CPU seconds per second (every process: supervisor, "
          f"workers, writer); this machine has {os.cpu_count()}, and wrk uses one of them too. "
          "More workers can carry more only while cores are left over.")
    for backend in sorted({key[0] for key in results}):
        counts = sorted({key[1] for key in results if key[0] == backend})
        if len(counts) < 2:
            continue
        one, most = counts[0], counts[-1]
        for mode, _, _ in RUNS:
            ratio = (results[backend, most, mode]["events_s"]
                     / results[backend, one, mode]["events_s"])
            print(f"{backend}, {mode}: {most} workers carry {ratio:.2f}x what {one} carries "
                  f"({'more' if ratio > 1.05 else 'no more'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    backends_arg(parser)
    parser.set_defaults(backend="sqlite")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    report(run(args.seconds, args.backend, counts), args.seconds)


if __name__ == "__main__":
    main()
