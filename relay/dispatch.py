"""The dispatcher: takes due deliveries from the spool, sends them, writes the outcome back.

One pipeline per delivery: load event -> render (payloads) -> sign (auth) -> send (aiohttp)
-> classify (policy) -> next attempt time (policy) -> record (spool). Nothing sleeps waiting to
retry: a retry is a new ``not_before`` in the spool, and the loop wakes on new work, on a
finished attempt, or when the next delivery falls due. Concurrency is bounded globally
(``delivery.concurrency``) and per host (``delivery.per_host_concurrency``); a host at its limit
is passed over, so it never holds up deliveries to other hosts.

A delivery is marked done only after its outcome is committed. A crash in between means the
attempt is made again: at-least-once, with the same ``Webhook-Id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import cachetools

from relay.auth import Signing
from relay.config import Config, Destination
from relay.errors import RenderError, SpoolError
from relay.events import Event, load_event
from relay.health import HELD_STATUS, HealthBoard, Host, counts_as_failure
from relay.metrics import Metrics
from relay.payloads import Renderer, Request, build_renderer
from relay.policy import Outcome, RetryPolicy, classify_error, classify_response, next_attempt_at
from relay.spool import Attempt, Due, Spool

log = logging.getLogger("relay.dispatch")

EXCERPT_BYTES = 1024
PREFETCH = 256       # due deliveries read from the spool at a time
IDLE_RECHECK = 60.0  # wake at least this often, e.g. after a replay made by another process


@dataclass(frozen=True, slots=True)
class Sent:
    """What one HTTP attempt produced."""

    outcome: Outcome
    attempt: Attempt
    response_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Route:
    """Everything needed to deliver to one destination, built once per config."""

    destination: Destination
    renderer: Renderer
    signing: Signing
    policy: RetryPolicy
    timeout: aiohttp.ClientTimeout
    host: str  # scheme://host:port, or the destination name when the host is a template
    latency: Any = None                       # its attempt-duration histogram child
    counted: dict[str, Any] = field(default_factory=dict)  # state -> deliveries counter child


def build_routes(config: Config, clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None) -> dict[str, Route]:
    routes = {}
    for dest in config.destinations:
        on_mint = metrics.jwt_minted.labels(dest.name).inc if metrics is not None else None
        routes[dest.name] = Route(
            destination=dest, renderer=build_renderer(dest, config),
            signing=Signing(dest, clock, on_mint),
            policy=RetryPolicy.for_destination(config.delivery, dest),
            timeout=aiohttp.ClientTimeout(total=dest.timeout or config.delivery.timeout),
            host=host_key(dest),
            # labelled children looked up once, not per delivery
            latency=metrics.attempt_seconds.labels(dest.name) if metrics is not None else None,
            counted={state: metrics.deliveries.labels(dest.name, outcome)
                     for state, outcome in (("delivered", "delivered"), ("pending", "retried"),
                                            ("failed", "failed"))} if metrics is not None else {})
    return routes


def host_key(dest: Destination) -> str:
    if "{" in (urlsplit(dest.url).netloc or "{"):
        return f"template:{dest.name}"
    parts = urlsplit(dest.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def client_session(config: Config) -> aiohttp.ClientSession:
    """One shared session: pooled keep-alive connections, TLS verified, no cookies."""
    context = ssl.create_default_context(cafile=config.delivery.ca_file)
    connector = aiohttp.TCPConnector(limit=config.delivery.concurrency,
                                     limit_per_host=config.delivery.per_host_concurrency,
                                     ssl=context, ttl_dns_cache=60)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                 auto_decompress=True)


async def send(session: aiohttp.ClientSession, request: Request,
               timeout: aiohttp.ClientTimeout | float,
               clock: Callable[[], float] = time.time) -> Sent:
    """Make one HTTP attempt; never raises for network trouble, it is an Outcome."""
    if not isinstance(timeout, aiohttp.ClientTimeout):
        timeout = aiohttp.ClientTimeout(total=timeout)
    started, t0 = clock(), time.monotonic()
    try:
        async with session.request(
                request.method, request.url, headers=request.headers, data=request.body or None,
                allow_redirects=False, timeout=timeout) as resp:
            raw = await resp.content.read(EXCERPT_BYTES)
            excerpt = raw.decode("utf-8", errors="replace")
            outcome = classify_response(resp.status, resp.headers.get("Retry-After"), clock())
            return Sent(outcome, Attempt(started, time.monotonic() - t0, resp.status, None,
                                         excerpt), resp.headers)
    except Exception as exc:
        error, detail = _error_class(exc, timeout.total or 0)
        outcome = classify_error(error, detail)
        return Sent(outcome, Attempt(started, time.monotonic() - t0, None,
                                     f"{error}: {detail}", None))


def _error_class(exc: BaseException, timeout: float) -> tuple[str, str]:
    """aiohttp's exception zoo -> the error classes of relay.policy."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_timeout", f"no connection within {timeout:g}s"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout", f"no response within {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "tls", detail
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", None)
    if dns_error is not None and isinstance(exc, dns_error):
        return "dns", detail
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect", detail
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected", "the server closed the connection without answering"
    if isinstance(exc, aiohttp.ClientOSError | aiohttp.ClientPayloadError | ConnectionError):
        return "reset", detail
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid_url", detail
    return "client_error", f"{type(exc).__name__}: {detail}"


class Dispatcher:
    """Delivers due deliveries from the spool until stopped."""

    def __init__(self, config: Config, spool: Spool, *,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random) -> None:
        self.spool = spool
        self.clock = clock
        self.rand = rand
        self.metrics = metrics or Metrics()
        self.session: aiohttp.ClientSession | None = None
        self.health = HealthBoard(config.health, on_change=self._host_changed)
        self._host_destinations: dict[str, list[str]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._ready: deque[Due] = deque()  # fetched, due, not started yet
        self._host_load: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # An event goes to several destinations: parse its stored JSON once, not per delivery.
        self._events: cachetools.LRUCache[int, Event] = cachetools.LRUCache(maxsize=4096)
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Use a (re)loaded config for every attempt started from now on.

        Attempts in flight finish with the route they started with. Deliveries of removed
        destinations stay pending in the spool (and go out again if the name comes back);
        host health is kept. Connection limits and the CA bundle apply after a restart.
        """
        self.config = config
        self.routes = build_routes(config, self.clock, self.metrics)
        self.health.config = config.health
        hosts: dict[str, list[str]] = {}
        for name, route in self.routes.items():
            hosts.setdefault(route.host, []).append(name)
        self._host_destinations = hosts
        self._ready.clear()  # may hold deliveries of a removed destination
        self._wake.set()

    async def start(self) -> None:
        self.session = client_session(self.config)
        self._task = asyncio.create_task(self._run(), name="relay-dispatcher")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, timeout: float) -> None:
        """Stop taking work; let attempts in flight finish for up to ``timeout`` seconds."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        pending = list(self._inflight.values())
        if pending:
            log.info("waiting up to %.0fs for %d attempts in flight", timeout, len(pending))
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:  # left pending in the spool: they are tried again after restart
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def host_destinations(self) -> dict[str, list[str]]:
        return self._host_destinations

    def host_load(self, host: str) -> int:
        return self._host_load[host]

    async def _run(self) -> None:
        limit = self.config.delivery.concurrency
        while not self._stopping:
            self._wake.clear()
            wait: float | None = IDLE_RECHECK
            try:
                now = self.clock()
                names = self._open_destinations(now)
                if len(self._inflight) < limit and not self._ready:
                    # Fetch a good batch at once: one read per batch, not one per slot. Hosts
                    # that are suspended or at their limit are left out of the query, so their
                    # backlog never stands in front of other hosts' deliveries.
                    exclude = self._inflight.keys()
                    self._ready.extend(await self.spool.due(
                        now, max(limit * 4, PREFETCH), names, exclude))
                    if not self._ready:
                        next_at = await self.spool.next_due_at(names, exclude)
                        if next_at is not None:
                            wait = min(max(0.0, next_at - now), IDLE_RECHECK)
                started = self._start_some(limit)
                if started and not self._ready and len(self._inflight) < limit:
                    continue  # the batch is used up and slots are free: more may be due
                probe_at = min((until for h in self._host_destinations
                                if (until := self.health.blocked_until(h)) is not None),
                               default=None)
                if probe_at is not None:
                    wait = min(wait or IDLE_RECHECK, max(0.0, probe_at - self.clock()))
            except SpoolError as exc:
                log.error("cannot read due deliveries: %s", exc)
                wait = 1.0
            # Otherwise: every slot is busy, or what is ready waits on busy hosts, or nothing is
            # due yet. A finished attempt, new work, the next due time or the end of a
            # suspension wakes the loop.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _open_destinations(self, now: float) -> list[str]:
        """Destinations whose host takes requests now: not suspended, not at its limit."""
        per_host = self.config.delivery.per_host_concurrency
        return [name for host, names in self._host_destinations.items()
                if self._host_load[host] < per_host and not self.health.is_blocked(host, now)
                for name in names]

    def _start_some(self, limit: int) -> int:
        """Start ready deliveries while slots are free, passing over busy or suspended hosts."""
        per_host = self.config.delivery.per_host_concurrency
        started = 0
        waiting: list[Due] = []
        now = self.clock()
        while self._ready and len(self._inflight) < limit:
            due = self._ready.popleft()
            route = self.routes.get(due.destination)
            if route is None:
                continue  # its destination was removed by a reload: it stays pending
            if self._host_load[route.host] >= per_host or not self.health.allow(route.host, now):
                waiting.append(due)  # held: not attempted, no retry used
                continue
            self._host_load[route.host] += 1
            self._inflight[due.seq] = asyncio.create_task(self._attempt(due, route))
            started += 1
        self._ready.extendleft(reversed(waiting))  # keep their place, oldest first
        if waiting and not started:
            # Only held or busy hosts have work ready: drop it, so the next fetch (which leaves
            # those hosts out) can see other hosts' deliveries.
            self._ready.clear()
        return started

    def _host_changed(self, host: Host, before: str, now: float) -> None:
        if host.state == "suspended":
            self.metrics.host_suspensions.labels(host.key).inc()
            if before == "healthy":
                self._spawn(self._count_held(host.key))
        if before == "suspended" and host.state == "probing":
            # The suspension is over: give its length back to the retry windows it ate into.
            held = now - host.suspended_at
            self._spawn(self.spool.add_held(self._host_destinations.get(host.key, []), held))
        self._wake.set()

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _count_held(self, host: str) -> None:
        """relay_deliveries_total{outcome="held"}: deliveries waiting when a host is suspended."""
        queued = await self.spool.pending_by_destination()
        for name in self._host_destinations.get(host, []):
            if queued.get(name):
                self.metrics.deliveries.labels(name, "held").inc(queued[name])

    def held(self, destination: str) -> dict[str, Any] | None:
        """The 598 Host Unhealthy marker for a destination whose host is suspended now."""
        route = self.routes.get(destination)
        if route is None:
            return None
        host = self.health.hosts.get(route.host)
        if host is None or host.state == "healthy":
            return None
        return {"status_code": HELD_STATUS, "reason": "Host Unhealthy", "host": route.host,
                "state": host.state, "until": host.suspended_until}

    async def _attempt(self, due: Due, route: Route) -> None:
        try:
            await self.deliver(due, route)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not kill the dispatcher; the delivery stays pending
            log.exception("delivery %s: unexpected error", due.delivery_id)
            await asyncio.sleep(1.0)
        finally:
            self.health.abandon_probe(route.host, self.clock())  # no-op unless it was unjudged
            self._host_load[route.host] -= 1
            self._inflight.pop(due.seq, None)
            self._wake.set()

    async def deliver(self, due: Due, route: Route) -> Outcome:
        """One attempt for one delivery, outcome committed to the spool before returning."""
        assert self.session is not None
        now = self.clock()
        try:
            event = self._events.get(due.event_seq)
            if event is None:
                event = self._events[due.event_seq] = load_event(due.event_json)
            request = route.renderer.render(event, due.delivery_id)
        except RenderError as exc:
            outcome = Outcome("failed", error="render", detail=str(exc))
            attempt = Attempt(now, None, None, f"render: {exc}", None)
        else:
            signed = route.signing.sign(request, due.delivery_id)
            sent = await send(self.session, signed, route.timeout, self.clock)
            outcome, attempt = sent.outcome, sent.attempt
            self.health.record(route.host, counts_as_failure(outcome), self.clock())
            if attempt.duration is not None and route.latency is not None:
                route.latency.observe(attempt.duration)
        failures = due.failures + (outcome.kind == "retry" and not outcome.unreachable)
        next_at = next_attempt_at(route.policy, outcome, attempts=due.attempts + 1,
                                  failures=failures,
                                  first_attempt_at=due.first_attempt_at or now,
                                  now=self.clock(), rand=self.rand(), held=due.held)
        if outcome.kind == "delivered":
            state, reason = "delivered", None
        elif next_at is not None:
            state, reason = "pending", outcome.detail
        else:
            state = "failed"
            reason = outcome.detail if outcome.kind == "failed" else \
                f"{outcome.detail} (retries exhausted after {due.attempts + 1} attempts)"
        try:
            await self.spool.record_attempt(due, attempt, state=state, not_before=next_at,
                                            failures=failures, reason=reason)
        except SpoolError as exc:
            log.error("delivery %s: cannot record the attempt (%s); it will be tried again",
                      due.delivery_id, exc)
            await asyncio.sleep(1.0)
            return outcome
        if state in route.counted:
            route.counted[state].inc()
        _log_attempt(due, route, outcome, state, next_at, self.clock())
        return outcome


def _log_attempt(due: Due, route: Route, outcome: Outcome, state: str, next_at: float | None,
                 now: float) -> None:
    if state == "delivered" and not log.isEnabledFor(logging.DEBUG):
        return  # the common case costs nothing
    extra: dict[str, Any] = {"delivery_id": due.delivery_id, "destination": due.destination,
                             "host": route.host, "outcome": state}
    if state == "delivered":
        log.debug("delivered %s to %s (%s)", due.delivery_id, due.destination, outcome.detail,
                  extra=extra)
    elif state == "pending":
        log.info("delivery %s to %s: %s; retry in %.0fs", due.delivery_id, due.destination,
                 outcome.detail, (next_at or now) - now, extra=extra)
    else:
        log.warning("delivery %s to %s failed: %s", due.delivery_id, due.destination,
                    outcome.detail, extra=extra)
