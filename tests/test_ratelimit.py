"""The token bucket and per-destination limits: pure, with time passed in."""

from __future__ import annotations

import pytest

from relay.config import parse_config
from relay.ratelimit import RateLimits, TokenBucket, replica_share


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    """A full bucket gives ``burst`` at once, then one token per 1/rate seconds."""
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.next_at(100.0) == pytest.approx(100.1)
    assert not bucket.take(100.05)
    assert bucket.take(100.1001)
    assert bucket.take(200.0) and bucket.take(200.0) and bucket.take(200.0)
    assert not bucket.take(200.0)  # never more than burst saved up


def test_bucket_does_not_go_back_in_time() -> None:
    """A clock that steps back neither adds nor removes tokens."""
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.take(50.0)
    assert not bucket.take(40.0)
    assert bucket.take(51.0)


@pytest.mark.parametrize(("seconds", "most"), [(0.0, 5), (1.0, 15), (2.5, 30)])
def test_starts_in_any_window_stay_within_burst_plus_rate(seconds: float, most: int) -> None:
    """Taking as fast as allowed, a window of w seconds holds at most burst + rate * w."""
    bucket = TokenBucket(rate=10, burst=5)
    times = [t / 1000 for t in range(0, 5000) if bucket.take(t / 1000)]
    for i, start in enumerate(times):
        inside = sum(1 for t in times[i:] if t - start <= seconds)
        assert inside <= most


def test_limits_by_destination_with_the_delivery_default() -> None:
    """A destination's own limit wins; delivery.rate_limit covers the others; burst defaults
    to one second's worth; replicas divide both."""
    config = parse_config("""
delivery: {rate_limit: {per_second: 4}}
destinations:
  - {name: a, format: braze, url: "https://a.example/", rate_limit: {per_second: 50, burst: 100}}
  - {name: b, format: braze, url: "https://b.example/"}
""")
    limits = RateLimits()
    limits.configure(config)
    assert (limits.buckets["a"].rate, limits.buckets["a"].burst) == (50, 100)
    assert (limits.buckets["b"].rate, limits.buckets["b"].burst) == (4, 4)
    limits.configure(config, share=2)
    assert (limits.buckets["a"].rate, limits.buckets["a"].burst) == (25, 50)
    assert replica_share({"RELAY_REPLICAS": "3"}) == 3
    assert replica_share({"RELAY_REPLICAS": "x"}) == replica_share({}) == 1


def test_next_at_names_the_earliest_empty_bucket_and_hold_counts() -> None:
    """next_at is the time the first held-back destination has a token again."""
    config = parse_config("""
destinations:
  - {name: a, format: braze, url: "https://a.example/", rate_limit: {per_second: 2, burst: 1}}
""")
    limits = RateLimits()
    limits.configure(config)
    assert limits.next_at(10.0, ["a"]) == 10.0
    assert limits.next_at(10.0, ["unlimited"]) is None
    assert limits.take("a", 10.0) and not limits.ready("a", 10.0)
    assert limits.next_at(10.0, ["a"]) == pytest.approx(10.5)
    limits.hold("a")
    assert limits.describe("a", 10.0) == {"per_second": 2.0, "burst": 1.0, "tokens": 0.0,
                                          "limited": 1}
    assert limits.take("unlimited", 10.0)
