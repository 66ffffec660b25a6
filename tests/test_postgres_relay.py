"""Real relay processes on a real PostgreSQL spool: the relay-process tests that matter most,
with ``spool.backend: postgres``. Nothing that got a 202 is lost: not across SIGKILLs, not
while the receiver is down, not while the database itself is stopped and started again."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import RelayProcess, event, eventually, http
from tests.pg import PgServer
from tests.receiver import Answer, Receiver
from tests.test_chaos import Senders, chaos_config, delivered, kill_under_load, wait_all_delivered

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def pg_spool(dsn: str) -> dict[str, Any]:
    return {"backend": "postgres", "postgres": {"dsn": dsn, "schema": "relay"}}


def test_sigkill_under_load_loses_nothing_on_postgres(tmp_path: Path, pg_dsn: str,
                                                      capsys: Any) -> None:
    """Kill -9 the relay three times under load: every acknowledged event is delivered."""
    rng = random.Random(11)
    with Receiver(Answer(200, delay=0.05)) as receiver:
        relay = RelayProcess(chaos_config(tmp_path, receiver, spool=pg_spool(pg_dsn)),
                             tmp_path / "relay.log").start()
        try:
            acked = kill_under_load(relay, receiver, rng, cycles=3, per_cycle=40,
                                    pause=(0.0, 1.5))
            assert len(acked) >= 120
            # a killed replica's claims wait for their lease: the default lease is
            # delivery.timeout (2 s here) + 30 s
            wait_all_delivered(receiver, acked, timeout=90)
            dupes = {p: sum(n - 1 for n in delivered(receiver, p).values() if n > 1)
                     for p in ("/a", "/b")}
            with capsys.disabled():
                print(f"\npostgres/SIGKILL x3: {len(acked)} events acknowledged, all delivered; "
                      f"duplicates {dupes}")
        finally:
            relay.stop()


def test_database_restart_under_load_loses_nothing(tmp_path: Path, pg_server: PgServer,
                                                   pg_dsn: str, capsys: Any) -> None:
    """PostgreSQL stops under load: ingest answers 503 with Retry-After, /readyz says the
    database is unreachable, the relay does not crash; when it is back every acknowledged
    event is delivered."""
    with Receiver(Answer(200)) as receiver:
        relay = RelayProcess(chaos_config(tmp_path, receiver, spool=pg_spool(pg_dsn)),
                             tmp_path / "relay.log").start()
        try:
            with Senders(relay, threads=2, pace=0.01) as senders:
                eventually(lambda: len(senders.acked), lambda n: n >= 50, timeout=60,
                           what="50 acknowledged events")
                pg_server.stop()
                _, headers, _ = eventually(
                    lambda: http("POST", relay.url + "/v1/events", event(99_999)),
                    lambda got: got[0] == 503, timeout=30, what="ingest refused while down")
                assert int(headers["Retry-After"]) > 0
                ready = eventually(lambda: http("GET", relay.url + "/readyz"),
                                   lambda got: got[0] == 503, timeout=30, what="readyz 503")
                assert "unreachable" in ready[2]["error"]
                time.sleep(2.0)
                pg_server.start()
                eventually(lambda: http("GET", relay.url + "/readyz")[0], lambda s: s == 200,
                           timeout=60, what="readyz 200 once the database is back")
                time.sleep(1.0)
            assert relay.proc is not None and relay.proc.poll() is None, "the relay crashed"
            acked = set(senders.acked)
            wait_all_delivered(receiver, acked, timeout=60)
            with capsys.disabled():
                print(f"\npostgres/restart: {len(acked)} events acknowledged, all delivered; "
                      f"503s to senders while down: {senders.non_ok.get(503, 0)}")
        finally:
            relay.stop()


def test_dead_letter_replay_spool_full_and_reload_on_postgres(tmp_path: Path, pg_dsn: str) -> None:
    """The operator's paths on PostgreSQL: a 400 is a dead letter, replay delivers it; at
    spool.max_events ingest answers 503; a config edit adds a destination that then gets its
    deliveries."""
    with Receiver(Answer(400)) as receiver:
        path = chaos_config(tmp_path, receiver, spool={**pg_spool(pg_dsn), "max_events": 5})
        relay = RelayProcess(path, tmp_path / "relay.log").start()
        try:
            assert http("POST", relay.url + "/v1/events", [event(i) for i in range(5)])[0] == 202
            full = http("POST", relay.url + "/v1/events", event(50))
            assert full[0] == 503 and int(full[1]["Retry-After"]) > 0
            failed = eventually(lambda: http("GET", relay.url + "/v1/deliveries?status=failed")[2],
                                lambda got: len(got["deliveries"]) == 10, timeout=30,
                                what="10 dead letters")
            assert {d["destination"] for d in failed["deliveries"]} == {"a", "b"}
            receiver.set_default(Answer(200))
            status, _, replayed = http("POST", relay.url + "/v1/deliveries/retry",
                                       {"destination": "a"})
            assert status == 202 and len(replayed["replayed"]) == 5
            eventually(lambda: {r.path for r in receiver.received() if r.status == 200},
                       lambda paths: paths == {"/a"}, timeout=30, what="the replays delivered")
            # room again (the 'a' deliveries are done, 'b' failed: every event is finished)
            eventually(lambda: http("POST", relay.url + "/v1/events", event(51))[0],
                       lambda s: s == 202, timeout=30, what="ingest accepted again")
            config = yaml.safe_load(path.read_text())
            config["destinations"].append({"name": "c", "format": "braze",
                                           "url": f"{receiver.url}/c"})
            path.write_text(yaml.safe_dump(config))
            eventually(relay.log, lambda log: "config reloaded" in log, timeout=30,
                       what="the reload")
            assert http("POST", relay.url + "/v1/events", event(52))[0] == 202
            eventually(lambda: [r for r in receiver.received() if r.path == "/c"],
                       lambda got: len(got) == 1, timeout=30, what="the new destination served")
        finally:
            relay.stop()
