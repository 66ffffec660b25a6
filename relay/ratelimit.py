"""Per-destination rate limits: token buckets, with time passed in (no sleeping, no I/O).

A destination with ``rate_limit: {per_second, burst}`` (or ``delivery.rate_limit``) may start
an attempt only when its bucket holds a token. One that may not waits, like a delivery of a
suspended host: it is not attempted, uses no retry and is no health failure; the dispatcher
wakes when the next token is due (``next_at``).

Several replicas on one PostgreSQL spool each apply ``per_second / replicas`` (and
``burst / replicas``), ``replicas`` being ``RELAY_REPLICAS`` (the chart sets it from its replica
count; default 1). With every replica live and busy the destination as a whole sees the
configured rate; a replica that is down leaves its share unused (the total errs low, never
high).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from relay.config import Config, RateLimit


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` held; starts full."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    at: float | None = None          # when ``tokens`` was last brought up to date

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if self.at is not None and now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        if self.at is None or now > self.at:
            self.at = now

    def ready(self, now: float) -> bool:
        """Would ``take`` succeed now? (Takes nothing.)"""
        self._refill(now)
        return self.tokens >= 1.0

    def whole(self, now: float) -> int:
        """The whole tokens there are now (takes nothing)."""
        self._refill(now)
        return int(self.tokens)

    def take(self, now: float) -> bool:
        """Use one token if there is one."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def next_at(self, now: float) -> float:
        """When the next token is there (``now`` if one is)."""
        self._refill(now)
        return now if self.tokens >= 1.0 else now + (1.0 - self.tokens) / self.rate


def replica_share(env: Mapping[str, str] | None = None) -> int:
    """How many replicas share each destination's limit: ``RELAY_REPLICAS``, default 1."""
    raw = (os.environ if env is None else env).get("RELAY_REPLICAS", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        return 1


def bucket_for(limit: RateLimit, share: int = 1) -> TokenBucket:
    burst = limit.burst if limit.burst is not None else max(1, math.ceil(limit.per_second))
    return TokenBucket(limit.per_second / share, max(1.0, burst / share))


class RateLimits:
    """Every rate-limited destination's bucket, and how often each held a delivery back."""

    def __init__(self) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        self.limited: dict[str, int] = {}   # deliveries held back, by destination (cumulative)

    def configure(self, config: Config, share: int = 1) -> None:
        """Buckets for ``config``; a destination whose limit did not change keeps its tokens."""
        old = self.buckets
        self.buckets = {}
        for dest in config.destinations:
            limit = dest.rate_limit or config.delivery.rate_limit
            if limit is None:
                continue
            bucket = bucket_for(limit, share)
            before = old.get(dest.name)
            if before is not None and (before.rate, before.burst) == (bucket.rate, bucket.burst):
                bucket = before
            self.buckets[dest.name] = bucket

    def ready(self, destination: str, now: float) -> bool:
        bucket = self.buckets.get(destination)
        return bucket is None or bucket.ready(now)

    def available(self, destination: str, now: float, most: int) -> int:
        """How many of ``most`` deliveries could take a token now (takes nothing)."""
        bucket = self.buckets.get(destination)
        return most if bucket is None else min(most, bucket.whole(now))

    def take(self, destination: str, now: float) -> bool:
        """Use a token of ``destination`` (always True when it has no limit)."""
        bucket = self.buckets.get(destination)
        return bucket is None or bucket.take(now)

    def hold(self, destination: str) -> None:
        """Count one delivery held back (the dispatcher counts each delivery once)."""
        self.limited[destination] = self.limited.get(destination, 0) + 1

    def next_at(self, now: float, destinations: Iterable[str]) -> float | None:
        """When the first of ``destinations`` (those held back) has a token again (``now`` if
        one has already), or None when none of them is rate-limited."""
        times = [bucket.next_at(now) for name in destinations
                 if (bucket := self.buckets.get(name)) is not None]
        return min(times, default=None)

    def describe(self, destination: str, now: float) -> dict[str, object] | None:
        """The ``rate_limit`` entry of a destination in /v1/hosts."""
        bucket = self.buckets.get(destination)
        if bucket is None:
            return None
        bucket.ready(now)
        return {"per_second": bucket.rate, "burst": bucket.burst,
                "tokens": round(bucket.tokens, 3), "limited": self.limited.get(destination, 0)}
