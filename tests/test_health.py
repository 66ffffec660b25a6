"""Host health state machine, every transition, with time passed in (no sleeping)."""

from __future__ import annotations

import pytest

from relay.config import HealthConfig
from relay.health import HealthBoard, counts_as_failure
from relay.policy import classify_error, classify_response

CONFIG = HealthConfig()  # SPEC defaults: 60 s window, 20 failures at 0.9, 10 in a row, 60 s..30 m
H = "https://h.example.com:443"


def board(**overrides: float) -> HealthBoard:
    return HealthBoard(CONFIG.model_copy(update=overrides))


def fail(b: HealthBoard, n: int, start: float = 0.0, step: float = 0.1) -> float:
    for i in range(n):
        b.record(H, True, start + i * step)
    return start + n * step


@pytest.mark.parametrize(("outcome", "counts"), [
    (classify_response(200), False), (classify_response(400), False),
    (classify_response(500), False), (classify_response(501), False),
    (classify_response(408), True), (classify_response(429), True),
    (classify_response(502), True), (classify_response(503), True),
    (classify_response(504), True), (classify_response(529), True),
    (classify_error("timeout"), True), (classify_error("connect"), True),
    (classify_error("dns"), True), (classify_error("tls"), True),
    (classify_error("reset"), True), (classify_error("render"), False),
])
def test_failures_that_count(outcome: object, counts: bool) -> None:
    """Only timeouts, connection errors and 408/429/502/503/504/529 count against a host."""
    assert counts_as_failure(outcome) is counts  # type: ignore[arg-type]


def test_consecutive_failures_trip() -> None:
    """consecutive_failures in a row suspend the host; one fewer does not."""
    b = board()
    fail(b, 9)
    assert b.host(H).state == "healthy" and b.allow(H, 1.0)
    fail(b, 1, start=1.0)
    assert b.host(H).state == "suspended" and not b.allow(H, 1.5)
    assert b.host(H).suspended_until == pytest.approx(61.0)


def test_success_resets_the_run() -> None:
    """A success between failures restarts the consecutive count."""
    b = board()
    fail(b, 9)
    b.record(H, False, 1.0)
    fail(b, 9, start=1.1)
    assert b.host(H).state == "healthy"


def test_failure_rate_trip_needs_both_count_and_rate() -> None:
    """min_failures at failure_rate within the window trips; a lower rate does not."""
    b = board(consecutive_failures=1000)
    t = 0.0
    for _ in range(20):                      # 20 failures, 2 successes: rate 0.909
        t = fail(b, 1, start=t)
        if _ % 10 == 0:
            b.record(H, False, t)
    assert b.host(H).state == "suspended"
    low = board(consecutive_failures=1000)
    t = 0.0
    for i in range(40):                      # 20 failures in 40: rate 0.5
        low.record(H, i % 2 == 0, t)
        t += 0.1
    assert low.host(H).state == "healthy"


def test_window_forgets_old_failures() -> None:
    """Failures older than the window do not count toward the rate trip."""
    b = board(consecutive_failures=1000)
    fail(b, 15, start=0.0)
    b.record(H, False, 1.0)
    fail(b, 15, start=100.0)                 # the first 15 are out of the 60 s window
    assert b.host(H).state == "healthy"
    assert b.host(H).failures_in_window() == 15


def test_probe_after_suspension_success_reopens() -> None:
    """When a suspension ends exactly one probe goes; its success makes the host healthy."""
    b = board()
    fail(b, 10)
    until = b.host(H).suspended_until
    assert not b.allow(H, until - 0.01)
    assert b.allow(H, until) and b.host(H).state == "probing"
    assert not b.allow(H, until + 0.01)      # only one probe at a time
    b.record(H, False, until + 0.5)
    assert b.host(H).state == "healthy" and b.host(H).suspensions == 0
    assert b.allow(H, until + 1)


def test_failed_probes_suspend_longer_up_to_the_cap() -> None:
    """Suspension = suspend_for x suspensions in a row, capped at suspend_max."""
    b = board(suspend_for=60, suspend_max=150)
    now = fail(b, 10)
    lengths = []
    for _ in range(4):
        host = b.host(H)
        lengths.append(round(host.suspended_until - host.suspended_at))
        now = host.suspended_until
        assert b.allow(H, now)
        b.record(H, True, now)               # the probe fails
    assert lengths == [60, 120, 150, 150]
    assert b.host(H).total_suspensions == 5


def test_results_during_suspension_change_nothing() -> None:
    """A request that started before the suspension and ends during it is ignored."""
    b = board()
    fail(b, 10)
    before = b.host(H).suspended_until
    b.record(H, False, 5.0)
    b.record(H, True, 6.0)
    assert b.host(H).state == "suspended" and b.host(H).suspended_until == before


def test_abandoned_probe_lets_the_next_request_probe() -> None:
    """A probe that produced no answer (render failure) hands the probe to the next request."""
    b = board()
    fail(b, 10)
    until = b.host(H).suspended_until
    assert b.allow(H, until)
    b.abandon_probe(H, until + 0.1)
    assert b.host(H).state == "suspended" and b.allow(H, until + 0.2)


def test_a_delivery_that_never_failed_takes_the_probe_first() -> None:
    """At the end of a suspension a stale delivery (it failed there before) is passed over once,
    so a fresh one asked next probes; asked again with no fresh one, the stale one probes."""
    b = board()
    fail(b, 10)
    until = b.host(H).suspended_until
    assert not b.allow(H, until, fresh=False)          # passed over: a fresh one may come
    assert b.host(H).state == "suspended"
    assert b.allow(H, until, fresh=True)               # the fresh one is the probe
    assert b.host(H).state == "probing"
    b.record(H, True, until + 1)                        # it fails: suspended again
    again = b.host(H).suspended_until
    assert not b.allow(H, again, fresh=False)
    assert b.allow(H, again, fresh=False)               # no fresh one came: the stale one goes


def test_state_changes_are_reported_once() -> None:
    """on_change fires once per transition: suspended, probing, healthy."""
    seen: list[tuple[str, str]] = []
    b = HealthBoard(CONFIG, on_change=lambda host, before, now: seen.append((before, host.state)))
    fail(b, 15)
    b.allow(H, 200.0)
    b.allow(H, 200.1)
    b.record(H, False, 200.2)
    assert seen == [("healthy", "suspended"), ("suspended", "probing"), ("probing", "healthy")]


def test_snapshot() -> None:
    """The snapshot names the state, failures in window, rate and suspension details."""
    b = board()
    fail(b, 10)
    (snap,) = b.snapshot(5.0)
    assert snap["host"] == H and snap["state"] == "suspended"
    assert snap["failures_in_window"] == 10 and snap["failure_rate"] == 1.0
    assert snap["suspensions_in_a_row"] == 1 and snap["suspended_for_s"] == pytest.approx(55.9)
