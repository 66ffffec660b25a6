"""Issue 21's figures of merit in one table: CPU per event (every process of the server, from
/proc) beside the bare server's and the forwarder's in the same run, and whether each target is
met. Runs bench/ingest.py, bench/e2e.py and bench/latency.py's measurements and prints their
tables first. Usage: python bench/hotpath.py [--seconds 10] [--events 20000] [--backend sqlite]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e
import ingest
import latency
from _common import BACKENDS, machine, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run and per rate")
    parser.add_argument("--events", type=int, default=20_000, help="end-to-end events")
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="sqlite")
    args = parser.parse_args()
    taken = ingest.run(args.seconds, args.backend)
    ingest.report(taken, args.seconds)
    ends = e2e.run(args.events, args.backend)
    e2e.report(ends)
    timed = latency.run((200, 1000), args.seconds, args.backend)
    latency.report(timed, args.seconds)

    bare, rows = taken["bare", "single"], []
    for backend in (b for b in BACKENDS if (b, "single") in taken):
        single, fwd, mine = taken[backend, "single"], ends["forwarder"], ends[backend]
        p99 = timed[backend][1000]["e2e_p99_ms"]
        for target, measured, limit, met in (
            ("CPU per single event, relay/bare (all processes)",
             single["cpu_s_per_1k"] / bare["cpu_s_per_1k"], "<= 1.6x", None),
            ("single-event throughput, relay/bare", single["req_s"] / bare["req_s"], ">= 0.6",
             None),
            ("p99 ingest latency at 64 connections, relay/bare",
             single["p99_ms"] / bare["p99_ms"], "<= 2x", None),
            ("end to end delivered/s, relay/forwarder", mine["events_s"] / fwd["events_s"],
             ">= 0.8", None),
            ("ingest-to-receiver p99 at 1,000 events/s, ms", p99, "<= 10", None),
            ("CPU per event end to end, relay/forwarder", mine["cpu_s_per_1k"] / fwd["cpu_s_per_1k"],
             "(figure)", "-"),
        ):
            if met is None:
                bound = float(limit.split()[1].rstrip("x"))
                met = "met" if (measured <= bound if limit.startswith("<=") else
                                measured >= bound) else "not met"
            rows.append((backend, target, f"{measured:.2f}", limit, met))
        rows.append((backend, "CPU s per 1k single events: relay / bare",
                     f"{single['cpu_s_per_1k']:.3f} / {bare['cpu_s_per_1k']:.3f}", "", "-"))
        rows.append((backend, "CPU s per 1k events end to end: relay / forwarder",
                     f"{mine['cpu_s_per_1k']:.3f} / {fwd['cpu_s_per_1k']:.3f}", "", "-"))
    table(f"Issue 21 targets, one run; {machine()}",
          ["spool", "target", "measured", "target", "met"], rows)


if __name__ == "__main__":
    main()
