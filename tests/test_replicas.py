"""Real relay processes sharing one PostgreSQL: one dedupe window, shared suspensions, work from
any replica, leases around slow and dead replicas, and a SIGTERM that hands work over."""

from __future__ import annotations

import itertools
import re
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RelayProcess, event, eventually, http
from tests.pg import pg_dsn, pg_server
from tests.receiver import Answer, Receiver
from tests.replicas import delivered, hosts, replicas, webhook_ids

__all__ = ["pg_dsn", "pg_server"]  # fixtures used here

pytestmark = pytest.mark.slow


def post(relay: RelayProcess, *events: dict[str, Any]) -> tuple[int, Any]:
    status, _, body = http("POST", relay.url + "/v1/events", list(events))
    return status, body


def stop_all(relays: list[RelayProcess]) -> None:
    for relay in relays:
        relay.stop()


def test_same_event_posted_to_three_replicas_at_once_is_stored_once(
        tmp_path: Path, pg_dsn: str) -> None:
    """The same id posted to three replicas at the same moment: one 202, two 200 duplicates,
    all naming the same deliveries; the receiver gets each event once."""
    with Receiver() as receiver:
        relays = [r.start() for r in replicas(tmp_path, pg_dsn, receiver, 3)]
        try:
            answers: dict[int, list[tuple[int, Any]]] = {i: [] for i in range(20)}
            lock = threading.Lock()
            barrier = threading.Barrier(3)

            def sender(relay: RelayProcess) -> None:
                for i in range(20):
                    barrier.wait()
                    answer = post(relay, event(i))
                    with lock:
                        answers[i].append(answer)
            threads = [threading.Thread(target=sender, args=(r,)) for r in relays]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            for i, got in answers.items():
                assert sorted(status for status, _ in got) == [200, 200, 202], (i, got)
                deliveries = {str(body["events"][0]["deliveries"]) for _, body in got}
                assert len(deliveries) == 1, (i, got)
                assert all(body.get("duplicate") for status, body in got if status == 200)
            found = eventually(lambda: delivered(receiver), lambda d: len(d) == 20,
                               what="every event delivered")
            assert set(found.values()) == {1}
        finally:
            stop_all(relays)


def test_suspension_by_one_replica_holds_all_three(tmp_path: Path, pg_dsn: str) -> None:
    """A receiver answering 503 behind three replicas: the shared count suspends it after
    about one health.consecutive_failures of requests in all (at most 1.5x, not 3x), and
    every replica's /v1/hosts shows it suspended."""
    threshold = 20
    with Receiver(Answer(503)) as receiver:
        relays = [r.start() for r in replicas(
            tmp_path, pg_dsn, receiver, 3,
            delivery={"per_host_concurrency": 2, "max_retries": 50, "retry_window": "10m"},
            health={"consecutive_failures": threshold, "min_failures": 1000,
                    "suspend_for": "5m", "suspend_max": "10m"})]
        try:
            for k, relay in enumerate(relays):
                assert post(relay, *[event(k * 100 + i) for i in range(10)])[0] == 202

            def held_everywhere() -> list[tuple[str, int]]:
                return [(h["state"], h["in_flight"]) for relay in relays for h in hosts(relay)]
            eventually(held_everywhere, lambda got: got == [("suspended", 0)] * 3, timeout=30,
                       what="every replica holding the host, nothing in flight")
            reached = len(receiver.received("/a"))
            print(f"\nshared suspension: {reached} requests reached the dead receiver "
                  f"(threshold {threshold}, 3 replicas)")
            assert threshold <= reached <= threshold * 1.5
            entry = hosts(relays[1])[0]
            assert entry["suspensions_total"] == 1 and entry["shared"] is True
        finally:
            stop_all(relays)


def test_listings_replay_and_test_send_work_from_any_replica(tmp_path: Path,
                                                            pg_dsn: str) -> None:
    """An event posted to one replica is listed by another; a delivery failed on one is
    replayed from another and delivered; a test send works from any replica."""
    with Receiver(Answer(400)) as receiver:
        one, two = relays = [r.start() for r in replicas(tmp_path, pg_dsn, receiver, 2)]
        try:
            status, body = post(one, event(1))
            assert status == 202
            delivery_id = body["events"][0]["deliveries"][0]["delivery_id"]

            def state() -> str:
                return str(http("GET", f"{two.url}/v1/deliveries/{delivery_id}")[2]["status"])
            eventually(state, lambda s: s == "failed", what="the delivery failed (400)")
            listed = http("GET", two.url + "/v1/deliveries?status=failed")[2]["deliveries"]
            assert [d["delivery_id"] for d in listed] == [delivery_id]
            receiver.set_default(Answer(200))
            status, _, _ = http("POST", f"{two.url}/v1/deliveries/{delivery_id}/retry")
            assert status == 202
            eventually(state, lambda s: s == "delivered", what="the replayed delivery sent")
            status, _, sent = http("POST", one.url + "/v1/destinations/a/test")
            assert status == 200 and sent["response"]["status"] == 200
        finally:
            stop_all(relays)


def test_slow_attempts_are_not_sent_twice_by_two_replicas(tmp_path: Path, pg_dsn: str) -> None:
    """Answers as slow as most of delivery.timeout, two live replicas: every delivery is sent
    exactly once (the default lease outlasts an attempt)."""
    with Receiver(Answer(200, delay=1.5)) as receiver:
        relays = [r.start() for r in replicas(tmp_path, pg_dsn, receiver, 2)]
        try:
            for k in range(4):
                assert post(relays[k % 2], *[event(k * 10 + i) for i in range(10)])[0] == 202
            eventually(lambda: delivered(receiver), lambda d: len(d) == 40, timeout=60,
                       what="every event delivered")
            assert set(webhook_ids(receiver).values()) == {1}
        finally:
            stop_all(relays)


def test_a_backlog_longer_than_a_lease_is_never_sent_by_two_replicas_at_once(
        tmp_path: Path, pg_dsn: str) -> None:
    """A look claims a batch at once, but a slow host takes it a little at a time: rows that
    waited in one replica's memory past their lease were claimed by the other replica as
    expired and sent by both, at the same time (the red team saw 137 of 300). A row whose
    lease would end before its attempt could is not started; the next look claims it again.
    Every delivery arrives, and none is in flight twice at once."""
    delay = 0.4
    with Receiver(Answer(200, delay=delay)) as receiver:
        relays = [r.start() for r in replicas(
            tmp_path, pg_dsn, receiver, 2, spool={"postgres": {"lease": "3s"}},
            delivery={"timeout": "1s", "per_host_concurrency": 4, "concurrency": 8})]
        try:
            assert post(relays[0], *[event(i) for i in range(100)])[0] == 202
            eventually(lambda: delivered(receiver), lambda d: len(d) == 100, timeout=90,
                       what="every event delivered")
            arrivals: dict[str, list[float]] = {}
            for r in receiver.received("/a"):
                arrivals.setdefault(r.headers["webhook-id"], []).append(r.at)
            overlapping = [key for key, times in arrivals.items()
                           if any(b - a < delay for a, b in itertools.pairwise(sorted(times)))]
            assert overlapping == [], f"{len(overlapping)} deliveries in flight twice at once"
        finally:
            stop_all(relays)


def test_a_dead_replicas_claims_are_taken_when_their_lease_ends(tmp_path: Path,
                                                                pg_dsn: str) -> None:
    """A replica killed (SIGKILL) with attempts in flight: another replica delivers what it
    had claimed once the leases end."""
    with Receiver(Answer(200, delay=30)) as receiver:
        one, two = relays = replicas(tmp_path, pg_dsn, receiver, 2,
                                     spool={"postgres": {"lease": "4s"}},
                                     delivery={"timeout": "1s"})
        try:
            one.start()
            assert post(one, *[event(i) for i in range(10)])[0] == 202
            receiver.wait_for(1, "/a")               # one's attempts are under way
            one.kill(signal.SIGKILL)
            receiver.set_default(Answer(200))
            two.start()
            eventually(lambda: delivered(receiver), lambda d: len(d) == 10, timeout=30,
                       what="the dead replica's deliveries delivered by the other")
        finally:
            stop_all(relays)


def test_sigterm_hands_claims_to_the_other_replicas(tmp_path: Path, pg_dsn: str) -> None:
    """A replica told to stop (SIGTERM) with slow attempts in flight abandons them after the
    drain timeout, releases every claim (not left to expire: the lease here is 10 minutes),
    says how many deliveries it leaves pending, exits 0; the other replica delivers them.
    (Those it had not started may not be its claims at all: beyond its free request slots,
    the deliveries it stored are any replica's.)"""
    with Receiver(Answer(200, delay=20)) as receiver:
        one, two = relays = replicas(tmp_path, pg_dsn, receiver, 2,
                                     spool={"postgres": {"lease": "10m"}},
                                     server={"drain_timeout": "500ms"},
                                     delivery={"timeout": "30s", "per_host_concurrency": 4})
        try:
            one.start()
            assert post(one, *[event(i) for i in range(30)])[0] == 202
            receiver.wait_for(4, "/a")               # 4 in flight at one
            two.start()
            assert one.kill(signal.SIGTERM) == 0
            receiver.set_default(Answer(200))
            log = one.log()
            assert "abandoning 4 attempts still in flight" in log
            # its 4 attempts' claims; the other 26 too if its first look had not finished
            # when they came (otherwise, beyond its free request slots, they were stored for
            # any replica: offers)
            released = re.search(r"replica r0 released (\d+) claimed deliveries; 30 "
                                 r"deliveries pending", log)
            assert released is not None and int(released[1]) in (4, 30), log
            eventually(lambda: delivered(receiver), lambda d: len(d) == 30, timeout=30,
                       what="every delivery the stopped replica left, delivered by the other")
        finally:
            stop_all(relays)
