"""The dispatcher's own CPU per delivery, in one process with no network and no spool: the
relay's real Dispatcher (relay/dispatch.py) with each destination format and auth, fed by a
stand-in spool that hands out due deliveries and takes their outcomes, and a stand-in transport
that answers 200 a loop turn later. So the figure is what the relay adds to every attempt
(parse the stored event, render, sign, schedule, classify, decide, health, metrics, hand the
outcome over) without aiohttp's client or the writer, which bench/e2e.py and bench/writer.py
measure; machine noise moves it much less than an end-to-end run.

CPU is this process's user + system time per delivery (``resource``), with the relay's
collector thresholds; each variant runs ``--rounds`` times, interleaved, and the medians are
printed. Usage: python bench/dispatch.py [--deliveries 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine, table

from relay.config import load_config
from relay.dispatch import Dispatcher
from relay.request import Exchange, Request
from relay.service import GC_THRESHOLDS
from relay.spool.records import Due, DueBatch

# A stored event as the relay keeps it (ids and occurred_at filled in at ingest).
EVENT = ('{"id":"evt-1","channel":"email","status":"delivered","message_id":"m-1",'
         '"recipient":{"email":"user@example.com"},"attributes":{"order_id":"42"},'
         '"request_id":"6b23186141333021512aa2cf1974e971",'
         '"occurred_at":"2026-12-04T20:19:13.537875+00:00"}')
URL = "https://hooks.example.com"
VARIANTS: dict[str, dict[str, Any]] = {
    "braze, no auth": {"format": "braze", "url": f"{URL}/braze"},
    "braze, Standard Webhooks signature": {
        "format": "braze", "url": f"{URL}/braze",
        "auth": {"type": "hmac", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}},
    "ajo, JWT (reused)": {
        "format": "ajo", "url": f"{URL}/ajo",
        "ajo": {"ims_org": "org", "sandbox": {"id": "sb", "name": "prod"}},
        "auth": {"type": "jwt", "algorithm": "HS256", "key": "k" * 40, "audience": "ajo"}},
    "template (Liquid), JSON body": {
        "format": "template", "url": f"{URL}/crm",
        "template": {"method": "POST", "body": {"type": "json", "fields": {
            "status": "{{ event.status }}", "message": "{{ event.message_id }}"}}}},
}


class _Spool:
    """Hands out ``count`` due deliveries of one destination; takes their outcomes."""

    def __init__(self, count: int, destination: str) -> None:
        self.rows = [Due(seq, f"dlv_{seq:031x}", destination, 0, 0, None, 0.0, seq, EVENT)
                     for seq in range(1, count + 1)]
        self.count, self.recorded = count, 0
        self.done = asyncio.Event()

    async def poll(self, now: float, limit: int, names: Any, exclude: Any = ()) -> DueBatch:
        batch, self.rows = self.rows[:limit], self.rows[limit:]
        return DueBatch(batch, not self.rows, None, 0)

    async def record_attempt(self, due: Due, attempt: Any, **outcome: Any) -> None:
        await asyncio.sleep(0)   # the writer's answer comes in a later loop turn
        self.recorded += 1
        if self.recorded == self.count:
            self.done.set()

    async def next_due_at(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Transport:
    async def handle_request(self, request: Request, timeout: float,
                             read_limit: int = 0) -> Exchange:
        await asyncio.sleep(0)   # the response comes in a later loop turn
        return Exchange(time.time(), 0.001, 200, {}, "ok")

    async def close(self) -> None:
        return None


async def _run(destination: dict[str, Any], count: int, workdir: Path) -> float:
    path = workdir / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "spool": {"path": str(workdir / "unused.db")},
        "delivery": {"concurrency": 64, "per_host_concurrency": 64},
        "destinations": [{"name": "d", **destination}]}))
    config = load_config(path, env={})
    spool = _Spool(count, "d")
    dispatcher = Dispatcher(config, spool, transport=_Transport())  # type: ignore[arg-type]
    before = resource.getrusage(resource.RUSAGE_SELF)
    await dispatcher.start()
    await asyncio.wait_for(spool.done.wait(), 600)
    after = resource.getrusage(resource.RUSAGE_SELF)
    await dispatcher.stop(5)
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gc.set_threshold(*GC_THRESHOLDS)   # as relay serve runs
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, destination in VARIANTS.items():
                runs[name].append(uvloop.run(_run(destination, args.deliveries, Path(tmp))))
    table(f"Dispatcher alone, in process: {args.deliveries} deliveries per run, one destination, "
          f"a stand-in spool and transport; median of {args.rounds}; {machine()}",
          ["destination", "CPU us per delivery", "each round"],
          [(name, f"{statistics.median(times):.1f}", ", ".join(f"{t:.1f}" for t in times))
           for name, times in runs.items()])


if __name__ == "__main__":
    main()
