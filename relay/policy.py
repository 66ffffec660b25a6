"""Delivery policy as pure functions: what an attempt's result means, and what happens next.

No I/O, no sleeping, no clock reads: time and randomness come in as arguments, so every rule
(README "Delivery rules") is a table-driven unit test. The dispatcher's steps:
``classify(exchange)`` -> ``Outcome``; ``decide(outcome, delivery, now, rules)`` -> ``Verdict``
(the delivery's next state, retry time, failure count and reason), which the spool records.

    response                               outcome
    2xx                                    delivered
    3xx (never followed)                   failed, not retried
    408, 429                               retried, Retry-After honoured (clamped)
    other 4xx                              failed, not retried
    5xx                                    retried (Retry-After honoured when sent)
    timeout, connection refused/reset,     retried; connection-level ones are "unreachable":
    DNS failure, TLS failure               their retries spread over unreachable_window
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from typing import Literal, Protocol

from relay.config import DeliveryConfig, Destination
from relay.frozen import frozen
from relay.request import Exchange

Kind = Literal["delivered", "retry", "failed"]

# Error classes, named at the transport boundary (relay.transport maps aiohttp's exceptions).
# Others are final: blocked (an internal address, see relay.egress), invalid_url, client_error,
# render; "internal" (a request that could not be prepared) is retried like a 5xx, and so are
# "token" (an OAuth2 token endpoint that gave no token) and "proxy" (the egress proxy refused).
UNREACHABLE_ERRORS = frozenset({"connect", "connect_timeout", "dns", "tls", "refused"})
RETRYABLE_ERRORS = UNREACHABLE_ERRORS | frozenset({"timeout", "reset", "disconnected",
                                                  "internal", "token", "proxy"})


@frozen
class Outcome:
    kind: Kind
    status: int | None = None       # HTTP status, when there was a response
    error: str | None = None        # error class, when there was none (or a render failure)
    detail: str = ""                # a human sentence for the activity log
    retry_after: float | None = None  # seconds the receiver asked us to wait
    unreachable: bool = False       # connection-level: counts toward unreachable_window


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 5
    retry_window: float = 1800.0
    unreachable_window: float = 86400.0
    backoff_initial: float = 30.0
    backoff_max: float = 600.0
    jitter: float = 0.2             # each delay is scaled by a factor in [1 - jitter, 1 + jitter]

    @classmethod
    def for_destination(cls, delivery: DeliveryConfig, dest: Destination) -> RetryPolicy:
        def pick(name: str) -> float:
            own = getattr(dest, name)
            return float(getattr(delivery, name) if own is None else own)

        return cls(max_retries=int(pick("max_retries")), retry_window=pick("retry_window"),
                   unreachable_window=pick("unreachable_window"),
                   backoff_initial=pick("backoff_initial"), backoff_max=pick("backoff_max"))


def classify(exchange: Exchange, now: float) -> Outcome:
    """Outcome of one attempt: by its response, or by its error class when there was none."""
    if exchange.status is not None:
        return classify_response(exchange.status, exchange.headers.get("Retry-After"), now)
    return classify_error(exchange.error or "client_error", exchange.detail)


def classify_response(status: int, retry_after: str | None = None, now: float = 0.0) -> Outcome:
    """Outcome of an HTTP response by its status code (and Retry-After header)."""
    if 200 <= status < 300:
        return Outcome("delivered", status=status, detail=f"{status}")
    if 300 <= status < 400:
        return Outcome("failed", status=status, detail=f"{status}: redirects are not followed")
    if status in (408, 429) or 500 <= status < 600:
        return Outcome("retry", status=status, detail=f"{status}",
                       retry_after=parse_retry_after(retry_after, now))
    return Outcome("failed", status=status, detail=f"{status}")


def classify_error(error: str, detail: str = "") -> Outcome:
    """Outcome of an attempt that got no response (error classes above)."""
    if error in RETRYABLE_ERRORS:
        return Outcome("retry", error=error, detail=detail or error,
                       unreachable=error in UNREACHABLE_ERRORS)
    return Outcome("failed", error=error, detail=detail or error)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from ``now``: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def backoff(policy: RetryPolicy, retry_number: int, rand: float) -> float:
    """Delay before retry ``retry_number`` (1-based): initial x 2^(n-1), jittered, capped."""
    base = policy.backoff_initial * (2 ** max(0, retry_number - 1))
    jittered = min(base, policy.backoff_max) * (1 - policy.jitter + 2 * policy.jitter * rand)
    return float(min(jittered, policy.backoff_max))


def next_attempt_at(
    policy: RetryPolicy,
    outcome: Outcome,
    *,
    attempts: int,
    failures: int,
    first_attempt_at: float,
    now: float,
    rand: float,
    held: float = 0.0,
) -> float | None:
    """When to try again after ``outcome``, or None when the delivery is finished.

    ``attempts`` counts every attempt so far (this one included) and sets the backoff step;
    ``failures`` counts retryable *responses* (5xx, 408, 429) so far, this one included: only
    those use up ``max_retries``. Unreachable endpoints are retried, with backoff, until
    ``unreachable_window`` after the first attempt; others until ``retry_window``.
    Retry-After replaces the computed delay, clamped to [1 s, backoff_max]. ``held`` is time the
    host spent suspended since the first attempt: it does not count toward ``retry_window``,
    but does toward ``unreachable_window`` (a host dead for days ends in the dead letter).
    """
    if outcome.kind != "retry":
        return None
    if not outcome.unreachable and failures > policy.max_retries:
        return None
    if outcome.retry_after is not None:
        delay = min(max(outcome.retry_after, 1.0), policy.backoff_max)
    else:
        delay = backoff(policy, attempts, rand)
    if outcome.unreachable:
        deadline = first_attempt_at + policy.unreachable_window
    else:
        deadline = first_attempt_at + held + policy.retry_window
    when = now + delay
    return when if when <= deadline else None


class Progress(Protocol):
    """What ``decide`` needs to know of a delivery before this attempt."""

    @property
    def attempts(self) -> int: ...
    @property
    def failures(self) -> int: ...
    @property
    def first_attempt_at(self) -> float | None: ...
    @property
    def held(self) -> float: ...


@frozen
class Verdict:
    """A delivery's state after one attempt, as the spool records it."""

    state: Literal["pending", "delivered", "failed"]
    not_before: float | None   # when to try again (pending only)
    failures: int              # retryable responses so far, this one included
    reason: str | None         # for the activity log; None once delivered


def decide(outcome: Outcome, delivery: Progress, now: float, rules: RetryPolicy, *,
           rand: float, started: float | None = None) -> Verdict:
    """The next state of ``delivery`` after an attempt (started at ``started``, judged at
    ``now``) that had ``outcome``: delivered, pending with a retry time, or failed."""
    failures = delivery.failures + (outcome.kind == "retry" and not outcome.unreachable)
    first = delivery.first_attempt_at
    if first is None:
        first = started if started is not None else now
    next_at = next_attempt_at(rules, outcome, attempts=delivery.attempts + 1, failures=failures,
                              first_attempt_at=first, now=now, rand=rand, held=delivery.held)
    if outcome.kind == "delivered":
        return Verdict("delivered", None, failures, None)
    if next_at is not None:
        return Verdict("pending", next_at, failures, outcome.detail)
    if outcome.kind == "failed":
        return Verdict("failed", None, failures, outcome.detail)
    return Verdict("failed", None, failures, f"{outcome.detail} (retries exhausted after "
                                             f"{delivery.attempts + 1} attempts)")
