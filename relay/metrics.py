"""Prometheus metrics (prometheus-client), one registry per relay process.

Names follow Prometheus conventions: ``relay_`` prefix, ``_total`` counters, ``_seconds``
units. Label values are config names (destination, host, state, outcome, reason): never event
data, never secrets. Counters are bumped where things happen; gauges that describe the spool
and hosts are refreshed just before each scrape.

No noise: no ``_created`` samples (prometheus-client can only turn them off for the whole
process, which is the relay's own), and a labelled series exists only where it applies: the
outcome counters of each configured destination start at 0 (``destinations_loaded``, at start
and on reload), JWT counters appear with a destination's first token, so never for a
destination without JWT auth.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Gauge as _Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Process-wide in prometheus-client (there is no per-registry switch): the relay's process.
disable_created_metrics()  # type: ignore[no-untyped-call]

# relay_deliveries_total outcomes a dashboard graphs for every destination, so they exist at 0
# from the start; "held" appears when a host is first suspended.
OUTCOMES = ("delivered", "retried", "failed", "skipped")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0)


# server.workers > 1: the supervisor gives every worker this directory before it imports
# prometheus-client, which then keeps each process's values in files there; a scrape of any
# worker sums the counters and histograms of all of them (prometheus-client's multiprocess
# mode). Gauges say how they combine: the spool and host gauges are the latest value any live
# worker set (each sets them from the shared spool before a scrape, the dispatching ones every
# second too), attempts in flight are summed.
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """True in a worker of server.workers > 1 (metrics shared through files)."""
    return bool(os.environ.get(MULTIPROC_DIR))


def Gauge(*args: Any, mode: str = "livemostrecent", **kwargs: Any) -> _Gauge:
    """A gauge that says how the workers' values combine (``mode``; relay/workers.py)."""
    return _Gauge(*args, **kwargs, multiprocess_mode=mode)  # type: ignore[misc,arg-type]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_accepted = Counter(
            "relay_events_accepted_total", "Events stored (202)", registry=r)
        self.events_rejected = Counter(
            "relay_events_rejected_total", "Ingest requests refused, by reason",
            ["reason"], registry=r)
        self.events_duplicate = Counter(
            "relay_events_duplicate_total", "Events not stored again: id seen within the "
            "dedupe window", registry=r)
        self.deliveries = Counter(
            "relay_deliveries_total", "Delivery outcomes: delivered, retried, failed, skipped, "
            "held", ["destination", "outcome"], registry=r)
        self.attempt_seconds = Histogram(
            "relay_attempt_duration_seconds", "Time from request to response (or error)",
            ["destination"], buckets=LATENCY_BUCKETS, registry=r)
        self.spool_deliveries = Gauge(
            "relay_spool_deliveries", "Deliveries in the spool, by state", ["state"], registry=r)
        self.oldest_due_age = Gauge(
            "relay_spool_oldest_due_age_seconds", "How long the oldest due delivery has been "
            "waiting (0 when none is due)", registry=r)
        self.open_events = Gauge(
            "relay_spool_open_events", "Events with a delivery still pending (spool.max_events "
            "bounds it)", registry=r)
        self.max_events = Gauge(
            "relay_spool_max_events", "spool.max_events: ingest answers 503 past it", registry=r)
        self.spool_bytes = Gauge(
            "relay_spool_bytes", "Bytes of the SQLite spool file in use, free pages not counted "
                                 "(0 on PostgreSQL)", registry=r)
        self.max_bytes = Gauge(
            "relay_spool_max_bytes", "spool.max_bytes: ingest answers 503 past it (0: no bound)",
            registry=r)
        self.host_state = Gauge(
            "relay_host_state", "1 for the state each destination host is in",
            ["host", "state"], registry=r)
        self.host_suspensions = Counter(
            "relay_host_suspensions_total", "Times a host was suspended", ["host"], registry=r)
        self.jwt_minted = Counter(
            "relay_jwt_tokens_minted_total", "JWTs signed (cached ones are reused)",
            ["destination"], registry=r)
        self.config_reloads = Counter(
            "relay_config_reloads_total", "Config reloads, by result", ["result"], registry=r)
        self.in_flight = Gauge(
            "relay_attempts_in_flight", "Delivery attempts under way", mode="livesum",
            registry=r)
        self.task_restarts = Counter(
            "relay_task_restarts_total", "Long-lived tasks restarted after a failure",
            ["task"], registry=r)

    def destinations_loaded(self, names: Iterable[str]) -> None:
        """Start each destination's outcome series at 0 (idempotent: counts are kept)."""
        for name in names:
            for outcome in OUTCOMES:
                self.deliveries.labels(name, outcome)

    def count_restart(self, task: str) -> None:
        self.task_restarts.labels(task).inc()

    def mint_counter(self, destination: str) -> Callable[[], None]:
        """A destination's "JWT minted" callback; its series appears with its first token."""
        return lambda: self.jwt_minted.labels(destination).inc()

    def render(self) -> bytes:
        if not multiprocess():
            return generate_latest(self.registry)
        every = CollectorRegistry()
        MultiProcessCollector(every)  # type: ignore[no-untyped-call]
        return generate_latest(every)
