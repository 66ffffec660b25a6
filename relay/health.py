"""Host health: a small state machine per host (scheme, host, port), time passed in.

    healthy --(trip)--> suspended --(suspension ends)--> probing --(probe ok)--> healthy
                            ^                                |
                            +-------(probe fails)------------+

Trip (README "Host health", after Braze's unhealthy-host detection): within the moving
``health.window`` at least ``min_failures`` failures at a failure rate of at least
``failure_rate``, or ``consecutive_failures`` failures in a row. Failures that count: timeouts,
connection errors, 408, 429, 502, 503, 504, 529; any other answer shows the host is up. A
suspension lasts ``suspend_for`` x suspensions in a row, at most ``suspend_max`` (Envoy's
growing ejection time). When it ends one probe goes first (Dapr's half-open state): success
reopens the host and resets the count; failure suspends it again, for longer.

No I/O and no clock reads here: the dispatcher asks ``allow`` before each request and reports
each result with ``record``. State lives in memory and is rebuilt after a restart: every host
starts healthy, and a dead one trips again within ``consecutive_failures`` requests, which is
cheaper and safer than trusting a stale suspension from before the restart.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from relay.config import HealthConfig
from relay.policy import Outcome

log = logging.getLogger("relay.health")

State = Literal["healthy", "suspended", "probing"]
COUNTED_STATUSES = frozenset({408, 429, 502, 503, 504, 529})
HELD_STATUS = 598  # what Braze records for a request not sent to an unhealthy host


def counts_as_failure(outcome: Outcome) -> bool:
    """Whether an attempt's outcome is a health failure for its host."""
    if outcome.status is not None:
        return outcome.status in COUNTED_STATUSES
    return outcome.error not in (None, "render", "invalid_url", "client_error", "internal",
                                 "blocked", "token")  # token: the destination was not called


@dataclass
class Host:
    key: str
    state: State = "healthy"
    results: deque[tuple[float, bool]] = field(default_factory=deque)  # (time, failed)
    consecutive: int = 0
    suspensions: int = 0          # in a row, since the host last recovered
    suspended_at: float = 0.0
    suspended_until: float = 0.0
    total_suspensions: int = 0
    passed_over: bool = False     # a stale candidate was refused the probe this suspension

    def failures_in_window(self) -> int:
        return sum(1 for _, failed in self.results if failed)

    def snapshot(self, now: float) -> dict[str, object]:
        total = len(self.results)
        failures = self.failures_in_window()
        return {
            "host": self.key, "state": self.state,
            "failures_in_window": failures, "requests_in_window": total,
            "failure_rate": round(failures / total, 3) if total else 0.0,
            "consecutive_failures": self.consecutive,
            "suspensions_in_a_row": self.suspensions,
            "suspensions_total": self.total_suspensions,
            "suspended_until": self.suspended_until if self.state != "healthy" else None,
            "suspended_for_s": round(max(0.0, self.suspended_until - now), 3)
            if self.state == "suspended" else 0.0,
        }


class HealthBoard:
    """Health of every host the relay talks to; see the module docstring."""

    def __init__(self, config: HealthConfig,
                 on_change: Callable[[Host, State, float], None] | None = None) -> None:
        self.config = config
        self.hosts: dict[str, Host] = {}
        self._on_change = on_change

    def host(self, key: str) -> Host:
        found = self.hosts.get(key)
        if found is None:
            found = self.hosts[key] = Host(key)
        return found

    def peek(self, key: str, now: float) -> dict[str, object]:
        """A host's snapshot, without creating an entry for a host never heard of."""
        host = self.hosts.get(key)
        return (host if host is not None else Host(key)).snapshot(now)

    def state_of(self, key: str) -> State:
        host = self.hosts.get(key)
        return host.state if host is not None else "healthy"

    def allow(self, key: str, now: float, fresh: bool = True) -> bool:
        """May a request go to this host now? At the end of a suspension, yes once: the probe.

        A probe should show whether the host is back, not whether one poisoned delivery still
        fails: a delivery that already failed (``fresh=False``) is passed over once, so a fresh
        one asked for next takes the probe; asked again, it takes the probe itself."""
        host = self.hosts.get(key)
        if host is None or host.state == "healthy":
            return True
        if host.state == "suspended" and now >= host.suspended_until:
            if not fresh and not host.passed_over:
                host.passed_over = True
                return False
            self._move(host, "probing", now)
            return True
        return False

    def blocked_until(self, key: str) -> float | None:
        """When a suspended host will take its probe; None if it takes requests now."""
        host = self.hosts.get(key)
        return host.suspended_until if host is not None and host.state == "suspended" else None

    def is_blocked(self, key: str, now: float) -> bool:
        host = self.hosts.get(key)
        if host is None or host.state == "healthy":
            return False
        return host.state == "probing" or now < host.suspended_until

    def record(self, key: str, failed: bool, now: float) -> None:
        """Count one request's result (finished at ``now``)."""
        host = self.host(key)
        if host.state == "probing":
            if failed:
                self._suspend(host, now)
            else:
                host.results.clear()
                host.consecutive = host.suspensions = 0
                self._move(host, "healthy", now)
            return
        if host.state == "suspended":
            return  # a request started before the suspension: it changes nothing now
        host.results.append((now, failed))
        horizon = now - self.config.window
        while host.results and host.results[0][0] < horizon:
            host.results.popleft()
        if not failed:
            host.consecutive = 0
            return
        host.consecutive += 1
        failures = host.failures_in_window()
        rate = failures / len(host.results)
        if (failures >= self.config.min_failures and rate >= self.config.failure_rate) or \
                host.consecutive >= self.config.consecutive_failures:
            self._suspend(host, now)

    def abandon_probe(self, key: str, now: float) -> None:
        """The probe produced no answer to judge (e.g. its payload failed to render): let the
        next request be the probe instead."""
        host = self.hosts.get(key)
        if host is not None and host.state == "probing":
            host.state, host.suspended_until = "suspended", now

    def _suspend(self, host: Host, now: float) -> None:
        host.suspensions += 1
        host.total_suspensions += 1
        length = min(self.config.suspend_for * host.suspensions, self.config.suspend_max)
        host.suspended_at, host.suspended_until = now, now + length
        self._move(host, "suspended", now)

    def _move(self, host: Host, state: State, now: float) -> None:
        before, host.state = host.state, state
        host.passed_over = False
        if state == "suspended":
            log.warning("host %s suspended for %.1fs (suspension %d in a row)", host.key,
                        host.suspended_until - now, host.suspensions)
        elif state == "probing":
            log.info("host %s: suspension over, sending one probe", host.key)
        else:
            log.info("host %s healthy again", host.key)
        if self._on_change is not None:
            self._on_change(host, before, now)

    def snapshot(self, now: float) -> list[dict[str, object]]:
        return [host.snapshot(now) for host in sorted(self.hosts.values(), key=lambda h: h.key)]
