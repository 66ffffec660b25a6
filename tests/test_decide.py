"""policy.classify and policy.decide: an attempt's result in, the delivery's next state out."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from relay.policy import Outcome, RetryPolicy, Verdict, classify, decide
from relay.request import Exchange

RULES = RetryPolicy(max_retries=2, retry_window=1800, unreachable_window=86400,
                    backoff_initial=30, backoff_max=600, jitter=0.0)
NOW = 10_000.0


@dataclass(frozen=True)
class Progress:
    attempts: int = 0
    failures: int = 0
    first_attempt_at: float | None = None
    held: float = 0.0


OK = Outcome("delivered", status=200, detail="200")
GONE = Outcome("failed", status=404, detail="404")
BUSY = Outcome("retry", status=503, detail="503")
DOWN = Outcome("retry", error="connect", detail="refused", unreachable=True)
SLOW = Outcome("retry", status=429, detail="429", retry_after=120.0)


@pytest.mark.parametrize(("outcome", "progress", "verdict"), [
    # delivered: done, no reason, failures unchanged
    (OK, Progress(), Verdict("delivered", None, 0, None)),
    (OK, Progress(attempts=3, failures=2, first_attempt_at=NOW - 100),
     Verdict("delivered", None, 2, None)),
    # a permanent answer fails at once, with the receiver's status as the reason
    (GONE, Progress(), Verdict("failed", None, 0, "404")),
    # a retryable response: backoff 30 s x 2^(attempts-1), one more failure counted
    (BUSY, Progress(), Verdict("pending", NOW + 30, 1, "503")),
    (BUSY, Progress(attempts=1, failures=1, first_attempt_at=NOW - 30),
     Verdict("pending", NOW + 60, 2, "503")),
    # max_retries (2) used up: the third retryable response is the last
    (BUSY, Progress(attempts=2, failures=2, first_attempt_at=NOW - 90),
     Verdict("failed", None, 3, "503 (retries exhausted after 3 attempts)")),
    # Retry-After replaces the backoff
    (SLOW, Progress(), Verdict("pending", NOW + 120, 1, "429")),
    # unreachable: retried without using up max_retries, until unreachable_window
    (DOWN, Progress(attempts=9, failures=2, first_attempt_at=NOW - 3600),
     Verdict("pending", NOW + 600, 2, "refused")),
    (DOWN, Progress(attempts=9, failures=0, first_attempt_at=NOW - 86_000),
     Verdict("failed", None, 0, "refused (retries exhausted after 10 attempts)")),
    # retry_window counts from the first attempt; held time (host suspended) is given back
    (BUSY, Progress(attempts=1, failures=0, first_attempt_at=NOW - 1790),
     Verdict("failed", None, 1, "503 (retries exhausted after 2 attempts)")),
    (BUSY, Progress(attempts=1, failures=0, first_attempt_at=NOW - 1790, held=600),
     Verdict("pending", NOW + 60, 1, "503")),
])
def test_decide_table(outcome: Outcome, progress: Progress, verdict: Verdict) -> None:
    """Each kind of outcome leads to the documented next state, retry time and reason."""
    assert decide(outcome, progress, NOW, RULES, rand=0.5) == verdict


def test_first_attempt_starts_the_retry_window_when_it_started() -> None:
    """A first attempt's window starts when it was sent, not when its answer came."""
    started = NOW - 1795.0   # a 30 s backoff from NOW ends past started + retry_window
    late = decide(BUSY, Progress(), NOW, RULES, rand=0.5, started=started)
    assert late == Verdict("failed", None, 1, "503 (retries exhausted after 1 attempts)")
    assert decide(BUSY, Progress(), NOW, RULES, rand=0.5).state == "pending"


@pytest.mark.parametrize(("exchange", "kind", "status", "error"), [
    (Exchange(NOW, 0.1, 204), "delivered", 204, None),
    (Exchange(NOW, 0.1, 302), "failed", 302, None),
    (Exchange(NOW, 0.1, 503, {"Retry-After": "7"}), "retry", 503, None),
    (Exchange(NOW, 5.0, error="timeout", detail="no response within 5s"), "retry", None, "timeout"),
    (Exchange(NOW, 0.0, error="connect", detail="refused"), "retry", None, "connect"),
    (Exchange(NOW, 0.0, error="invalid_url", detail="bad"), "failed", None, "invalid_url"),
])
def test_classify_exchange(exchange: Exchange, kind: str, status: int | None, error: str | None) -> None:
    """What a transport saw maps to the outcome of the response table (Retry-After kept)."""
    outcome = classify(exchange, NOW)
    assert (outcome.kind, outcome.status, outcome.error) == (kind, status, error)
    if exchange.headers.get("Retry-After"):
        assert outcome.retry_after == 7.0
