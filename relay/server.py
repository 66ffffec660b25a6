"""The HTTP face of the relay: ingest, health, and the activity log.

Owns the status codes and JSON shapes of the API (README "HTTP API"). A handler validates, hands
the spool its work and answers; it never waits on a destination. Anything a client sends gets a
4xx with a JSON body naming the problem, or 503 when the spool cannot take more; never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from aiohttp import web

from relay import __version__, tracing
from relay.config import Config
from relay.destinations import CompiledDestination, compile_destinations
from relay.errors import InvalidEvent, SpoolError, SpoolFull
from relay.events import accept_body, parse_events
from relay.listener import RawHandler
from relay.logs import Throttle
from relay.metrics import CONTENT_TYPE_LATEST, Metrics, multiprocess
from relay.routing import Router
from relay.spool import Attempt, DeliveryRecord, Receipt
from relay.spool.contract import SpoolBackend
from relay.spool.records import iso
from relay.testsend import test_send
from relay.vocab import DELIVERY_STATES

log = logging.getLogger("relay.server")

class DispatchView(Protocol):
    """What the API reads of delivery in progress (the dispatcher), and nothing more."""

    @property
    def in_flight(self) -> int: ...

    def wake(self) -> None: ...

    def offer(self, receipt: Receipt) -> None:
        """Deliveries this process's ingest just stored: start them without a spool read."""
        ...

    def held(self, destination: str) -> dict[str, Any] | None:
        """The "598 Host Unhealthy" marker when the destination's host is not healthy now."""
        ...

    def hosts(self, now: float) -> list[dict[str, Any]]:
        """Each destination host: its health snapshot, ``destinations`` and ``in_flight``."""
        ...

    def not_ready(self) -> str | None:
        """Why delivery does not work now (a task restarting, dispatching paused), or None."""
        ...


class _Recent:
    """Spool reads for /metrics and /v1/hosts, each shared for ``ttl`` seconds: whatever the
    number of scrapers, the counts run at most once a second (on the API's reader)."""

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, asyncio.Future[Any]]] = {}
        self._next: dict[str, float] = {}

    async def pace(self, key: str, interval: float) -> None:
        """Return ``interval`` after the previous caller for ``key`` did (sleeping till then)."""
        now = time.monotonic()
        turn = max(now, self._next.get(key, now))
        self._next[key] = turn + interval
        if turn > now:
            await asyncio.sleep(turn - now)

    async def get(self, key: str, read: Callable[[], Awaitable[Any]]) -> Any:
        """The last reading if under ``ttl`` old, or the reading under way (one at a time:
        a read that hangs, as on a blackholed database, is shared, not started again per
        caller), or a new one."""
        now = time.monotonic()
        found = self._entries.get(key)
        if found is None or (found[1].done() and (
                now - found[0] > self.ttl or found[1].exception() is not None)):
            found = (now, asyncio.ensure_future(read()))
            self._entries[key] = found
        return await asyncio.shield(found[1])


class _Warned:
    """When the last "spool full" warning was logged (one per 10 s; the metric counts all)."""

    at = -1e9


CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
SPOOL: web.AppKey[SpoolBackend] = web.AppKey("spool")
ROUTER: web.AppKey[Router] = web.AppKey("router", Router)
DESTINATIONS: web.AppKey[dict[str, CompiledDestination]] = web.AppKey("destinations", dict)
STATE: web.AppKey[dict[str, Any]] = web.AppKey("state", dict)
WAKE: web.AppKey[Callable[[], None]] = web.AppKey("wake")
OFFER: web.AppKey[Callable[[Receipt], None]] = web.AppKey("offer")
DISPATCHER: web.AppKey[DispatchView | None] = web.AppKey("dispatcher")
WARNED: web.AppKey[_Warned] = web.AppKey("warned", _Warned)
RECENT: web.AppKey[_Recent] = web.AppKey("recent", _Recent)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
ACCESS: web.AppKey[tuple[Any, ...]] = web.AppKey("access", tuple)
NOT_FOUND: web.AppKey[str] = web.AppKey("not_found", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_INT = 2**63       # SQLite's and PostgreSQL's integers: no number from a client beyond
MAX_REPLAY_IDS = 10_000


def create_app(config: Config, spool: SpoolBackend, dispatcher: DispatchView | None = None,
               metrics: Metrics | None = None,
               destinations: dict[str, CompiledDestination] | None = None) -> web.Application:
    """The aiohttp application; the caller opens and closes the spool and the dispatcher.

    Without a dispatcher the API still ingests and shows the spool (tests, tools).
    ``destinations`` are the config's compiled destinations (for test sends), compiled here
    when not given.
    """
    app = web.Application(client_max_size=config.server.max_body_bytes,
                          middlewares=[_guard])
    app[METRICS] = metrics or Metrics()
    apply_config(app, config, destinations)
    app[SPOOL] = spool
    app[STATE] = {"draining": False}
    app[WAKE] = dispatcher.wake if dispatcher is not None else (lambda: None)
    app[OFFER] = dispatcher.offer if dispatcher is not None else (lambda receipt: None)
    app[DISPATCHER] = dispatcher
    app[WARNED] = _Warned()
    app[RECENT] = _Recent()
    app.router.add_post("/v1/events", post_events, expect_handler=expect_events)
    app.router.add_get("/v1/deliveries", list_deliveries)
    app.router.add_post("/v1/deliveries/retry", retry_many, expect_handler=expect_continue)
    app.router.add_get("/v1/deliveries/{delivery_id}", get_delivery)
    app.router.add_post("/v1/deliveries/{delivery_id}/retry", retry_one,
                        expect_handler=expect_continue)
    app.router.add_post("/v1/destinations/{name}/test", test_destination,
                        expect_handler=expect_continue)
    app.router.add_get("/v1/hosts", list_hosts)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app[NOT_FOUND] = "no such path; the API's paths are " + ", ".join(
        f"{route.method} {route.resource.canonical}" for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD") + " (docs/api.md)"
    return app


def apply_config(app: web.Application, config: Config,
                 destinations: dict[str, CompiledDestination] | None = None) -> None:
    """Switch the app to a (re)loaded config: routing, token, client networks, and the
    destinations' metric series.

    ``server.listen`` and ``server.max_body_bytes`` are bound when the listener starts; the
    service warns that changing them needs a restart.
    """
    app[CONFIG] = config
    compiled = destinations if destinations is not None else compile_destinations(config)
    app[DESTINATIONS] = compiled
    app[ROUTER] = Router(config)
    app[METRICS].destinations_loaded(compiled.keys())
    token = config.server.token.get_secret_value().encode() if config.server.token else None
    app[ACCESS] = (token, tuple(ipaddress.ip_network(c, strict=False)
                                for c in config.server.allow_cidrs))


def error(status: int, message: str, **extra: Any) -> web.Response:
    headers = extra.pop("headers", None)
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


# -- Expect: 100-continue -------------------------------------------------------------------


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` answered with the final status when the headers already decide
    it (403, 401), so the client does not upload a body for nothing; else ``100 Continue``.
    aiohttp calls it before the middlewares."""
    return await _expect(request, lambda _: None)


async def expect_events(request: web.Request) -> web.StreamResponse | None:
    """``expect_continue`` for ``POST /v1/events``, with its 415 and 413 too."""
    return await _expect(request, _ingest_headers_refused)


async def _expect(request: web.Request,
                  check: Callable[[web.Request], web.Response | None]) -> web.Response | None:
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        return _closing(error(417, f"only Expect: 100-continue is understood (got {expect!r})"))
    refused = _refused(request) or check(request)
    if refused is not None:
        return _closing(refused)
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the final response is still to come
    return None


def _closing(response: web.Response) -> web.Response:
    # The client holds its body back: the connection cannot carry another request.
    response.force_close()
    return response


def _ingest_headers_refused(request: web.Request, app: web.Application | None = None
                            ) -> web.Response | None:
    """415 for a body that is not JSON, 413 for a Content-Length over the limit, or None.
    (``app`` is the request's, when the caller has it at hand.)"""
    if app is None:
        app = request.app
    headers = request.headers
    # The usual header as it is, without parsing it (aiohttp's parse costs ~1 us a request)
    if headers.get("Content-Type") != "application/json":
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            app[METRICS].events_rejected.labels("unsupported_media_type").inc()
            given = ctype if "Content-Type" in headers else "none"  # (aiohttp's default)
            return error(415, f"Content-Type must be application/json (got {given or 'none'})")
    limit = app[CONFIG].server.max_body_bytes
    length = headers.get("Content-Length")
    if length is not None and int(length) > limit:
        app[METRICS].events_rejected.labels("too_large").inc()
        return error(413, _too_large(limit))
    return None


def _too_large(limit: int) -> str:
    return f"the body is larger than server.max_body_bytes ({limit} bytes)"


# -- ingest ---------------------------------------------------------------------------------


async def post_events(request: web.Request) -> web.Response:
    app = request.app
    config, spool, router, metrics = app[CONFIG], app[SPOOL], app[ROUTER], app[METRICS]
    refused = _ingest_headers_refused(request, app)
    if refused is not None:
        return refused
    try:
        if request.content.is_eof():  # the whole body has arrived: nothing to wait for (a
            body = await request.read()  # timeout costs more than the rest of this read)
        else:
            async with asyncio.timeout(config.server.read_timeout):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.events_rejected.labels("too_large").inc()
        return error(413, _too_large(config.server.max_body_bytes))
    except TimeoutError:
        metrics.events_rejected.labels("timeout").inc()
        return error(408, f"the body did not arrive within server.read_timeout "
                          f"({config.server.read_timeout:g}s)", headers={"Connection": "close"})
    try:
        events, _ = parse_events(body, config.server.max_batch)
    except InvalidEvent as exc:
        metrics.events_rejected.labels("invalid").inc()
        return error(400, exc.summary, details=exc.details())
    batch = [(accepted, router.route(accepted))
             for accepted in accept_body(body, events, time.time(),
                                         tracing.incoming(request.headers))]
    # The parsed events (a big event's attributes weigh several times its text) and the raw
    # body are not needed while the spool commits: let them go before waiting.
    del events, body
    try:
        receipt = await spool.ingest_receipt(batch)
    except SpoolFull as exc:
        metrics.events_rejected.labels("spool_full").inc()
        now, warned = time.monotonic(), app[WARNED]
        if now - warned.at >= 10.0:  # a full spool refuses every request: say it once per 10 s
            warned.at = now
            log.warning("ingest refused (503): %s", exc)
        return error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
    except SpoolError as exc:
        # (one line per request flooded an outage's log)
        _INGEST_FAILED.say(log.error, "ingest failed: %s", exc)
        metrics.events_rejected.labels("spool_error").inc()
        app[WAKE]()   # the writer may have committed them before it failed to answer
        return error(503, spool.unavailable or "the spool cannot store events right now",
                     headers={"Retry-After": "5"})
    _count_ingest(metrics, receipt)
    if receipt.pending:
        app[OFFER](receipt)
    every_repeat = receipt.stored == 0   # 200 when nothing was new: a retried request
    answer = '{"events":' + receipt.events_json + (',"duplicate":true}' if every_repeat else "}")
    return web.Response(body=answer.encode(), status=200 if every_repeat else 202,
                        content_type="application/json")


_INGEST_FAILED = Throttle(10.0)
_SPOOL_DOWN = Throttle(10.0)


def _count_ingest(metrics: Metrics, receipt: Receipt) -> None:
    if receipt.duplicates:
        metrics.events_duplicate.inc(receipt.duplicates)
    if receipt.stored:
        metrics.events_accepted.inc(receipt.stored)
    for destination in receipt.skipped:
        metrics.deliveries.labels(destination, "skipped").inc()


# -- activity log ---------------------------------------------------------------------------


# The query parameters of each GET of the API (`after`: the old name of `next`, still taken).
# Any other is refused, as is any on a POST but POST /v1/events: a typo (`?state=failed`) was
# ignored, and the whole log listed.
DELIVERIES_QUERY = ("status", "destination", "limit", "next")


def _unknown_query(request: web.Request, takes: tuple[str, ...] = (),
                   also: tuple[str, ...] = ()) -> web.Response | None:
    """The 400 naming the query parameters that ``request``'s endpoint does not take (it takes
    ``takes``, listed, and ``also``, not listed), or None."""
    if not request.query_string:
        return None
    unknown = [name for name in dict.fromkeys(request.query) if name not in takes + also]
    if not unknown:
        return None
    names = ", ".join(repr(name if len(name) <= 40 else name[:37] + "...")
                      for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    route = request.match_info.route.resource
    endpoint = f"{request.method} {route.canonical if route is not None else request.path}"
    return error(400, f"unknown query parameter{'s' if len(unknown) > 1 else ''} {names}: "
                      f"{endpoint} takes " + (", ".join(takes) if takes else
                                              "no query parameters"))


async def list_deliveries(request: web.Request) -> web.Response:
    refused = _unknown_query(request, DELIVERIES_QUERY, also=("after",))
    if refused is not None:
        return refused
    query = request.query
    state = query.get("status") or None
    if state is not None and state not in DELIVERY_STATES:
        return error(400, f"status must be one of {', '.join(DELIVERY_STATES)} (got {state!r})")
    given = query.get("limit", "100"), query.get("next", query.get("after", "0")) or "0"
    # (int() also takes " 5", "+5", "5_0" and other scripts' digits)
    if not all(value.isascii() and value.isdigit() for value in given):
        return error(400, "limit and next must be whole numbers")
    limit, after = int(given[0]), int(given[1])
    if not 1 <= limit <= 1000:
        return error(400, "limit must be between 1 and 1000")
    if not 0 <= after < MAX_INT:
        return error(400, "next must be a cursor from a previous answer (0 <= next < 2**63)")
    destination = query.get("destination") or None
    if destination is not None and not _text(destination):
        return error(400, "destination must be a destination name")
    records = await request.app[SPOOL].list_deliveries(
        state=state, destination=destination, after=after, limit=limit)
    next_cursor = str(records[-1].seq) if len(records) == limit else None
    attempts = await request.app[SPOOL].attempts_of([r.seq for r in records])
    return web.json_response({
        "deliveries": [_delivery_json(request, r, attempts.get(r.seq, [])) for r in records],
        "next": next_cursor})


def _delivery_json(request: web.Request, record: DeliveryRecord,
                   attempts: list[Attempt]) -> dict[str, Any]:
    found = record.to_json() | {"attempts": [a.to_json() for a in attempts]}
    dispatcher = request.app[DISPATCHER]
    if record.state == "pending" and dispatcher is not None:
        held = dispatcher.held(record.destination)
        if held is not None:  # Braze records a simulated "598 Host Unhealthy" here
            found["held"] = held | {"until": iso(held["until"])}
    return found


async def get_delivery(request: web.Request) -> web.Response:
    refused = _unknown_query(request)
    if refused is not None:
        return refused
    spool = request.app[SPOOL]
    if not _text(request.match_info["delivery_id"]):   # (no id holds a NUL: none is found)
        return error(404, f"no delivery {request.match_info['delivery_id']!r}")
    record = await spool.get_delivery(request.match_info["delivery_id"])
    if record is None:
        return error(404, f"no delivery {request.match_info['delivery_id']!r}")
    attempts = (await spool.attempts_of([record.seq])).get(record.seq, [])
    return web.json_response(_delivery_json(request, record, attempts))


async def list_hosts(request: web.Request) -> web.Response:
    """Health of every destination host, with the deliveries waiting for it."""
    refused = _unknown_query(request)
    if refused is not None:
        return refused
    dispatcher = request.app[DISPATCHER]
    if dispatcher is None:
        return web.json_response({"hosts": []})
    queued = await request.app[RECENT].get("queued", request.app[SPOOL].pending_by_destination)
    hosts = []
    for entry in dispatcher.hosts(time.time()):
        if entry["suspended_until"] is not None:
            entry["suspended_until"] = iso(entry["suspended_until"])
        entry["queued"] = sum(queued.get(name, 0) for name in entry["destinations"])
        hosts.append(entry)
    return web.json_response({"hosts": hosts})


# -- replay and test send -------------------------------------------------------------------


async def retry_one(request: web.Request) -> web.Response:
    """Replay one failed delivery: pending again, due now, fresh retry windows."""
    refused = _unknown_query(request)
    if refused is not None:
        return refused
    spool, delivery_id = request.app[SPOOL], request.match_info["delivery_id"]
    record = await spool.get_delivery(delivery_id) if _text(delivery_id) else None
    if record is None:
        return error(404, f"no delivery {delivery_id!r}")
    if record.state != "failed":
        return error(409, f"only failed deliveries can be replayed; this one is {record.state}")
    replayed = await spool.replay(delivery_ids=[delivery_id])
    request.app[WAKE]()
    return web.json_response({"replayed": replayed}, status=202)


async def retry_many(request: web.Request) -> web.Response:
    """Replay failed deliveries by ``delivery_ids``, ``destination`` and/or ``failed_since``."""
    # (its filters are the body's: ?destination=crm beside {"failed_since": 0} replayed every
    # destination's failed deliveries)
    refused = _unknown_query(request)
    if refused is not None:
        return refused
    try:
        body = json.loads(await request.read() or b"{}", parse_int=_whole) \
            if request.can_read_body else {}
    except (ValueError, RecursionError):
        return error(400, "the body must be a JSON object")
    if not isinstance(body, dict) or set(body) - {"delivery_ids", "destination", "failed_since"}:
        return error(400, "expected {\"delivery_ids\": [...], \"destination\": ..., "
                          "\"failed_since\": unix seconds}; at least one of them")
    ids, destination, since = body.get("delivery_ids"), body.get("destination"), \
        body.get("failed_since")
    if ids is None:
        ids = []
    if not (isinstance(ids, list) and len(ids) <= MAX_REPLAY_IDS
            and all(isinstance(i, str) and len(i) <= 256 and _text(i) for i in ids)):
        return error(400, f"delivery_ids must be a list of at most {MAX_REPLAY_IDS} ids")
    if not (destination is None or (isinstance(destination, str)
                                    and 0 < len(destination) <= 256 and _text(destination))):
        return error(400, "destination must be a destination name")
    known = request.app[DESTINATIONS]
    if destination is not None and destination not in known:
        # (its failed deliveries, if any, have nowhere to go: a replay would report them
        # replayed and leave them pending for good; a typo replayed nothing and said 202)
        return error(400, f"no destination {destination!r} (destinations: "
                          f"{', '.join(known) or 'none configured'})")
    if not (ids or destination or since is not None):
        return error(400, "say which failed deliveries to replay: delivery_ids, destination "
                          "or failed_since (use failed_since: 0 for all)")
    if not (since is None or (isinstance(since, int | float) and not isinstance(since, bool)
            and math.isfinite(since) and 0 <= since < MAX_INT)):
        return error(400, "failed_since must be unix seconds (a number, 0 for all)")
    replayed = await request.app[SPOOL].replay(delivery_ids=ids, destination=destination,
                                               failed_since=since)
    if replayed:
        request.app[WAKE]()
    return web.json_response({"replayed": replayed}, status=202)


def _whole(digits: str) -> int | float:
    """A JSON integer as ``int``; one too long for ``int()`` (4,300 digits, Python's guard
    against slow conversions) as an infinite float, so the check of the field it is in names
    that field, where json's ValueError made it a body that is not JSON."""
    return int(digits) if len(digits) <= 4000 else float(digits)


def _text(value: str) -> bool:
    """``value`` is text the spool can store: JSON's ``\\ud800`` (a lone surrogate) is not,
    nor a NUL (PostgreSQL's text cannot hold one: a 500)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


async def test_destination(request: web.Request) -> web.Response:
    """Send a synthetic event to one destination now, bypassing the spool."""
    refused = _unknown_query(request)
    if refused is not None:
        return refused
    name = request.match_info["name"]
    target = request.app[DESTINATIONS].get(name)
    if target is None:
        return error(404, f"no destination {name!r}")
    return web.json_response(await test_send(request.app[CONFIG], target))


# -- health ---------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text format. A scrape is answered from a rendering at most a second old,
    and scrapes are paced (SCRAPE_PACE apart, whatever the number of scrapers): Prometheus
    scrapes every few seconds, and a scraper in a loop must not take delivery's core."""
    recent = request.app[RECENT]
    await recent.pace("metrics", SCRAPE_PACE)
    body = await recent.get("metrics", lambda: _render_metrics(request.app))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


SCRAPE_PACE = 0.05  # seconds between two scrape answers: at most 20 a second in all
SPOOL_GAUGES_WAIT = 2.0   # seconds a scrape waits for the spool's counts, then goes without


async def _render_metrics(app: web.Application) -> bytes:
    """Refresh the spool and host gauges, then render every metric."""
    metrics, spool, recent = app[METRICS], app[SPOOL], app[RECENT]
    bounds = app[CONFIG].spool
    try:
        async with asyncio.timeout(SPOOL_GAUGES_WAIT):
            counts = await recent.get("counts", spool.counts)
            for state in DELIVERY_STATES:
                metrics.spool_deliveries.labels(state).set(counts.get(state, 0))
            oldest = await recent.get("oldest", lambda: spool.oldest_due(time.time()))
            metrics.oldest_due_age.set(max(0.0, time.time() - oldest) if oldest is not None
                                       else 0.0)
            stats = await recent.get("stats", spool.stats)
            metrics.open_events.set(stats.get("open_events", 0))
            metrics.spool_bytes.set(stats.get("bytes", 0))
    except (SpoolError, TimeoutError):
        # The spool cannot be read (its database is down, or does not answer): every other
        # series still goes out, the spool's keep their last values, and /readyz says why.
        # (A 500 here lost every series exactly during the outage they should show; a
        # blackholed database held every scrape for the client's command timeout.)
        pass
    metrics.max_events.set(bounds.max_events)
    metrics.max_bytes.set(bounds.max_bytes)
    dispatcher = app[DISPATCHER]
    if dispatcher is not None and not getattr(dispatcher, "remote", False):
        dispatch_gauges(metrics, dispatcher)
    if multiprocess():   # reads a file per worker that ever ran: off the event loop
        return await asyncio.to_thread(metrics.render)
    return metrics.render()


def dispatch_gauges(metrics: Metrics, dispatcher: DispatchView) -> None:
    """Set the attempts-in-flight and host-state gauges from a dispatcher of this process."""
    metrics.in_flight.set(dispatcher.in_flight)
    for host in dispatcher.hosts(time.time()):
        for health in ("healthy", "suspended", "probing"):
            metrics.host_state.labels(host["host"], health).set(int(health == host["state"]))


async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE]["draining"]:
        return error(503, "draining: the relay is shutting down")
    spool = request.app[SPOOL]
    if not spool.is_open:
        return error(503, "the spool is not open")
    if not spool.writable:
        return error(503, spool.unavailable or "the spool cannot store events right now")
    dispatcher = request.app[DISPATCHER]
    if dispatcher is not None and (why := dispatcher.not_ready()) is not None:
        return error(503, why)
    return web.json_response({"status": "ready"})


# -- middlewares ----------------------------------------------------------------------------


# Open to probes and scrapers whatever server.token and server.allow_cidrs say: the kubelet
# and Prometheus carry no token, and metrics carry config names only (no event data, no secret).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _refused(request: web.Request) -> web.Response | None:
    """server.allow_cidrs for every path but ``OPEN_PATHS`` and server.token for /v1/*: the
    403 or 401 answer, or None when the request may go on."""
    token, networks = request.app[ACCESS]
    if networks and request.path not in OPEN_PATHS:
        try:
            remote = ipaddress.ip_address(request.remote or "")
        except ValueError:
            remote = None
        if remote is None or not any(remote in net for net in networks):
            request.app[METRICS].events_rejected.labels("forbidden").inc()
            return error(403, "this client address is not in server.allow_cidrs")
    if token is not None and request.path.startswith("/v1/"):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # A header with non-ASCII bytes (aiohttp keeps them as surrogates) is simply wrong.
        if scheme.lower() != "bearer" or not given.isascii() \
                or not hmac.compare_digest(given.strip().encode(), token):
            request.app[METRICS].events_rejected.labels("unauthorized").inc()
            return error(401, _unauthorized(request.headers.get("Authorization"), scheme),
                         headers={"WWW-Authenticate": 'Bearer realm="relay"'})
    return None


def _unauthorized(header: str | None, scheme: str) -> str:
    """Which of the three it was, for a 401: no header, another scheme, or a Bearer token that
    is not server.token. Nothing about the token itself (not its length, nor how close the
    one given was): the comparison above is the only one made with it."""
    if header is None:
        return "no Authorization header: send Authorization: Bearer <server.token>"
    if scheme.lower() != "bearer":
        return ("the Authorization header is not a Bearer token: send "
                "Authorization: Bearer <server.token>")
    return "wrong Bearer token: it is not the relay's server.token"


def ingest_shortcut(app: web.Application, handler: RawHandler) -> RawHandler:
    """``handler`` (the app's own: aiohttp's router, then its middlewares) with a shortcut for
    the hot path: a ``POST /v1/events`` without ``Expect`` goes straight to ``_guard`` and
    ``post_events``, where the router would send it, with the route's match info made once
    instead of per request (and an ``Expect`` it does not understand gets the JSON 417 on
    every path). It skips the router's lookup, the middleware chain's two wrappers
    and the loop lookup in aiohttp's ``Application._handle`` (on Python 3.11 a ``getpid``
    system call per request): 10 % of the event loop's instructions per single event
    (docs/performance.md). Every other request, and one with ``Expect`` (whose 100 or
    final answer the route's expect handler gives), takes ``handler``.

    The path is compared as the router compares it (``path_safe``: ``%2F`` stays encoded), so
    what takes the shortcut is exactly what the router would route to ``post_events``. Used by
    relay/service.py through ``Runner``; tests/test_shortcut.py checks both ways answer alike.
    """
    from aiohttp.web_urldispatcher import UrlMappingMatchInfo

    route = next(r for r in app.router.routes()
                 if r.method == "POST" and r.handler is post_events)
    # Shared by every such request: frozen, and post_events neither writes to it (it is a
    # dict of the path's parts, here none) nor needs the middleware that sets the current app.
    match = UrlMappingMatchInfo({}, route)
    match.add_app(app)
    match.freeze()

    async def handle(request: web.Request) -> web.StreamResponse:
        expect = request.headers.get("Expect")
        if expect is None:
            if request.method == "POST" and request.rel_url.path_safe == "/v1/events":
                request._match_info = match
                return await _guard(request, post_events)
        elif expect.lower() != "100-continue":
            # on every path (aiohttp's own answer, for a path with no route, is plain text)
            return _closing(error(417, f"only Expect: 100-continue is understood "
                                       f"(got {expect!r})"))
        return await handler(request)

    return cast(RawHandler, handle)  # aiohttp's Server hands it the app's web.Request


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``_refused`` for every request; aiohttp's own 404/405/413 pages become JSON. (One
    middleware, not two: each costs a wrapper call per request.)"""
    refused = _refused(request)
    if refused is not None:
        return refused
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # (no handler raises a 404: this is the router's, for a path it has no route for)
        message = request.app[NOT_FOUND] if exc.status == 404 else exc.reason
        return error(exc.status, message, headers={
            k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")})
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return error(400, f"not valid JSON: {exc}")
    except SpoolError as exc:
        # (ingest answers its own 503s; this is the activity log, replays and the rest when
        # the spool cannot be reached: a 500 with a traceback before). The cause stays in the
        # log: it can name the database's address.
        if isinstance(exc, SpoolFull):
            return error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
        _SPOOL_DOWN.say(log.warning, "%s %s: the spool cannot answer: %s", request.method,
                        request.path, exc)
        return error(503, "the spool cannot answer right now; try again shortly",
                     headers={"Retry-After": "5"})
