"""Pure delivery policy: every row of the response table, Retry-After, backoff, windows."""

from __future__ import annotations

import email.utils

import pytest

from relay.policy import (
    Outcome,
    RetryPolicy,
    backoff,
    classify_error,
    classify_response,
    next_attempt_at,
    parse_retry_after,
)

POLICY = RetryPolicy(max_retries=5, retry_window=1800, unreachable_window=86400,
                     backoff_initial=30, backoff_max=600, jitter=0.2)


@pytest.mark.parametrize(("status", "kind"), [
    (200, "delivered"), (201, "delivered"), (202, "delivered"), (204, "delivered"),
    (299, "delivered"),
    (301, "failed"), (302, "failed"), (304, "failed"), (307, "failed"), (308, "failed"),
    (400, "failed"), (401, "failed"), (403, "failed"), (404, "failed"), (409, "failed"),
    (410, "failed"), (413, "failed"), (422, "failed"),
    (408, "retry"), (429, "retry"),
    (500, "retry"), (502, "retry"), (503, "retry"), (504, "retry"), (529, "retry"),
])
def test_response_table(status: int, kind: str) -> None:
    """Each row of SPEC.md's response table maps to its outcome."""
    outcome = classify_response(status)
    assert outcome.kind == kind and outcome.status == status and not outcome.unreachable


@pytest.mark.parametrize(("error", "kind", "unreachable"), [
    ("timeout", "retry", False), ("connect_timeout", "retry", True), ("connect", "retry", True),
    ("refused", "retry", True), ("dns", "retry", True), ("tls", "retry", True),
    ("reset", "retry", False), ("disconnected", "retry", False),
    ("invalid_url", "failed", False), ("render", "failed", False),
])
def test_error_table(error: str, kind: str, unreachable: bool) -> None:
    """Network errors retry (connection-level ones as unreachable); the rest fail."""
    outcome = classify_error(error)
    assert (outcome.kind, outcome.unreachable) == (kind, unreachable)


def test_retry_after_forms() -> None:
    """Retry-After as seconds or as an HTTP date; garbage is ignored."""
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120
    date = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(90, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 50, usegmt=True), now) == 0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None
    assert classify_response(429, "7", now).retry_after == 7


@pytest.mark.parametrize(("n", "rand", "expected"), [
    (1, 0.5, 30), (2, 0.5, 60), (3, 0.5, 120), (5, 0.5, 480), (6, 0.5, 600), (20, 0.5, 600),
    (1, 0.0, 24), (1, 1.0, 36), (6, 1.0, 600),
])
def test_backoff_doubles_with_jitter_and_cap(n: int, rand: float, expected: float) -> None:
    """initial x 2^(n-1), scaled by jitter in [0.8, 1.2], never above backoff_max."""
    assert backoff(POLICY, n, rand) == pytest.approx(expected)


def retry(**kw: object) -> Outcome:
    return Outcome("retry", status=503, **kw)  # type: ignore[arg-type]


def test_next_attempt_uses_backoff_and_stops_after_max_retries() -> None:
    """5 retries after the first failure, then none."""
    now = 1000.0
    assert next_attempt_at(POLICY, retry(), attempts=1, failures=1, first_attempt_at=now,
                           now=now, rand=0.5) == now + 30
    assert next_attempt_at(POLICY, retry(), attempts=5, failures=5, first_attempt_at=now,
                           now=now + 100, rand=0.5) == now + 100 + 480
    assert next_attempt_at(POLICY, retry(), attempts=6, failures=6, first_attempt_at=now,
                           now=now + 200, rand=0.5) is None


def test_retry_window_bounds_retries() -> None:
    """A retry that would land after retry_window is not scheduled."""
    assert next_attempt_at(POLICY, retry(), attempts=2, failures=2, first_attempt_at=0,
                           now=1790, rand=0.5) is None
    assert next_attempt_at(POLICY, retry(), attempts=2, failures=2, first_attempt_at=0,
                           now=1700, rand=0.5) == 1760


def test_unreachable_spreads_over_unreachable_window_without_using_retries() -> None:
    """Connection failures keep retrying (backoff capped) until unreachable_window."""
    gone = Outcome("retry", error="connect", unreachable=True)
    assert next_attempt_at(POLICY, gone, attempts=40, failures=0, first_attempt_at=0,
                           now=80000, rand=0.5) == 80600
    assert next_attempt_at(POLICY, gone, attempts=41, failures=0, first_attempt_at=0,
                           now=86000, rand=0.5) is None


def test_retry_after_is_honoured_within_limits() -> None:
    """Retry-After replaces the backoff, clamped to [1 s, backoff_max]."""
    def at(seconds: float) -> float | None:
        return next_attempt_at(POLICY, retry(retry_after=seconds), attempts=1, failures=1,
                               first_attempt_at=0, now=0, rand=0.5)
    assert at(120) == 120 and at(0) == 1 and at(99999) == 600


def test_final_outcomes_have_no_next_attempt() -> None:
    """Delivered and failed outcomes are never rescheduled."""
    for outcome in (classify_response(200), classify_response(400), classify_response(302)):
        assert next_attempt_at(POLICY, outcome, attempts=1, failures=0, first_attempt_at=0,
                               now=0, rand=0.5) is None
