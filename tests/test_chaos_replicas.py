"""Chaos with three replicas on one PostgreSQL: senders spread across them, a receiver failing
on and off, SIGKILL of a random replica at random moments, and one PostgreSQL restart. Every
event that got a 202 is delivered; duplicates (at-least-once) are counted and printed."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RelayProcess, eventually
from tests.pg import PgServer, pg_dsn, pg_server
from tests.receiver import Answer, Receiver
from tests.replicas import delivered, replicas
from tests.test_chaos import Senders

__all__ = ["pg_dsn", "pg_server"]  # fixtures used here

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

KILLS = 4


def test_three_replicas_sigkill_and_database_restart_lose_nothing(
        tmp_path: Path, pg_server: PgServer, pg_dsn: str, capsys: Any) -> None:
    """SIGKILL a random replica four times (restarting it each time) and restart PostgreSQL
    once, under load on all three, while the receiver is slow or failing: every acknowledged
    event is delivered in the end."""
    rng = random.Random()
    with Receiver(Answer(200, delay=0.02)) as receiver:
        relays = replicas(tmp_path, pg_dsn, receiver, 3,
                          spool={"postgres": {"lease": "5s"}},
                          delivery={"max_retries": 50, "retry_window": "30m"},
                          health={"consecutive_failures": 20, "suspend_for": "500ms",
                                  "suspend_max": "2s"})
        try:
            run(relays, receiver, pg_server, rng, capsys)
        finally:
            for relay in relays:
                relay.stop()


def run(relays: list[RelayProcess], receiver: Receiver, pg_server: PgServer,
        rng: random.Random, capsys: Any) -> None:
    for relay in relays:
        relay.start()
    senders = [Senders(relay, threads=2) for relay in relays]
    kills: list[str] = []
    try:
        for s in senders:
            s.__enter__()

        def acked() -> int:
            return sum(len(s.acked) for s in senders)
        for cycle in range(KILLS + 1):
            receiver.set_default([Answer(200, delay=0.2), Answer(503),
                                  Answer(200, delay=0.02)][cycle % 3])
            eventually(acked, lambda n, want=60 * (cycle + 1): n >= want, timeout=60,
                       what="60 more acknowledged events this cycle")
            time.sleep(rng.uniform(0.0, 1.5))
            if cycle == 2:                     # the database goes away, and comes back
                pg_server.stop()
                time.sleep(rng.uniform(0.5, 1.5))
                pg_server.start()
                kills.append("postgres")
                continue
            victim = rng.randrange(3)
            relays[victim].kill(signal.SIGKILL)
            kills.append(f"r{victim}")
            time.sleep(rng.uniform(0.0, 0.3))
            relays[victim].start(timeout=30)
        receiver.set_default(Answer(200))
        time.sleep(1.0)
    finally:
        for s in senders:
            s.__exit__(None, None, None)
    everything = set().union(*(s.acked for s in senders))
    assert len(everything) > 200, "the load was too light to mean anything"
    eventually(lambda: len(everything - set(delivered(receiver))), lambda n: n == 0,
               interval=0.2, timeout=90,
               what="every acknowledged event delivered (value: how many not yet)")
    dupes = sum(n - 1 for n in delivered(receiver).values() if n > 1)
    refused: Counter[int] = Counter()
    for s in senders:
        refused.update(s.non_ok)
    with capsys.disabled():
        print(f"\nchaos/3 replicas ({', '.join(kills)}): {len(everything)} events "
              f"acknowledged, all delivered; duplicate deliveries: {dupes}; "
              f"non-2xx answers to senders: {dict(refused)}")
    assert set(refused) <= {503}
