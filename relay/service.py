"""Process lifecycle: open the spool, serve HTTP, and shut down cleanly on SIGTERM/SIGINT.

Shutdown order matters for "nothing accepted is lost": readyz turns 503, the listener closes,
in-flight requests finish (their commits included) within ``server.drain_timeout``, then the
spool commits what is queued and closes. Background upkeep (pruning old records) runs here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from relay import __version__, tracing
from relay.config import Config
from relay.destinations import Loaded, load
from relay.dispatch import Dispatcher
from relay.errors import SpoolError
from relay.health_shared import SharedHealth, shared_health
from relay.listener import Runner, cannot_listen
from relay.logs import MASK, config_secrets
from relay.metrics import Metrics, multiprocess
from relay.reload import ConfigWatcher
from relay.server import (
    STATE,
    DispatchView,
    apply_config,
    create_app,
    dispatch_gauges,
    ingest_shortcut,
)
from relay.spool import Spool
from relay.spool.backends import open_spool
from relay.spool.contract import SpoolBackend
from relay.spool.files import log_pending, private_spool_files
from relay.supervise import Supervisor
from relay.workers import RemoteDispatch, Role, publish_dispatch, say_ready

log = logging.getLogger("relay")

PRUNE_EVERY = 3600.0
FOLLOW_EVERY = 0.5  # seconds: how soon a replica hears of work the others stored, retried,
                    # replayed or released
# The collector's thresholds while serving. At Python's default (700, 10, 10) the young
# generation was collected ~1,600 times per 20,000 events delivered end to end, and collecting
# took 0.6-0.7 s of CPU (~30 us per event); at 10,000 it took 0.06-0.09 s. Reference counting
# frees nearly everything a request allocates, so the collector mostly walks what outlives one
# (attempts in flight, cached events), again and again. bench/e2e.py's load, six alternating
# pairs: relay CPU per event -10 % and delivered/s +12.5 % (medians). The longest young
# collection grows to ~15 ms under saturation; full collections (~30 ms each) become rare.
# docs/performance.md.
GC_THRESHOLDS = (10_000, 10, 10)


async def run(loaded: Loaded, *, metrics: Metrics | None = None,
              config_path: str | None = None, stop: asyncio.Event | None = None,
              role: Role | None = None) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives; SIGHUP reloads ``config_path``.

    ``loaded`` was made by ``relay.destinations.load`` with ``metrics.mint_counter``, so its
    signers count into ``metrics``. ``role``: this process is one of server.workers, started
    by a supervisor (relay/workers.py).
    """
    config, metrics = loaded.config, metrics or Metrics()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    tracing.enabled()  # set up now: an OTEL_* value the SDK refuses is reported at start-up
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    sqlite = config.spool.backend == "sqlite"
    if sqlite and role is None:
        private_spool_files(config.spool.path)
    spool = open_spool(config.spool, delivery_timeout=config.longest_timeout(),
                       writer_socket=role.writer_socket if role and sqlite else None)
    await spool.open()
    supervisor = Supervisor(metrics.count_restart)
    delivers = role is None or role.delivers(config.spool.backend)
    dispatcher: Dispatcher | None = None
    view: DispatchView
    if delivers:
        dispatcher = view = Dispatcher(
            config, spool, destinations=loaded.destinations, metrics=metrics,
            supervisor=supervisor, **_health_for(config, spool))
        if isinstance(dispatcher.health, SharedHealth):  # replicas share suspensions and work
            dispatcher.health.wake = dispatcher.wake
            from relay.spool.postgres import PostgresSpool  # (asyncpg: an optional extra)
            assert isinstance(spool, PostgresSpool)
            spool.offers = dispatcher.offer_mark   # fresh deliveries start from memory here too
            supervisor.spawn("shared-health", dispatcher.health.follow)
            supervisor.spawn("other-replicas",
                             lambda: _follow_other_replicas(spool, dispatcher.wake))
        await dispatcher.start()
    else:
        assert role is not None
        view = remote = RemoteDispatch(role.dispatch_state)
        supervisor.spawn("dispatch-state", remote.follow)
    if sqlite and dispatcher is not None:
        # Woken when a writer is reached again after a failure (its last group may have been
        # committed unanswered) and, as worker 0 of SQLite workers, when another worker
        # stored events.
        assert isinstance(spool, Spool)
        spool.on_wake = dispatcher.others_stored
        if role is not None:  # worker 0: its delivery state published for the others' API
            supervisor.spawn("publish-dispatch", lambda: publish_dispatch(
                dispatcher, lambda: dispatcher.destinations, role.dispatch_state))
    if dispatcher is not None and multiprocess():
        supervisor.spawn("dispatch-gauges", lambda: _refresh_gauges(metrics, dispatcher))
    app = create_app(config, spool, view, metrics, loaded.destinations)
    runner = Runner(app, config, max_connections=_connection_cap(config),
                    shortcut=ingest_shortcut, shutdown_timeout=config.server.drain_timeout)
    await runner.setup()
    host, port = config.server.host_port
    if role is not None:  # one of server.workers: the port the supervisor holds, shared
        port = role.port
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True,
                       reuse_port=role is not None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if dispatcher is not None:
            await dispatcher.stop(0)
        await spool.close()
        raise cannot_listen(config.server.listen, port, exc) from exc
    # Everything made while starting (config, pydantic schemas, aiohttp, prometheus) lives as
    # long as the process: keep it out of the collector's full passes, which otherwise walk all
    # of it every few seconds under load (GC time measured 170-200 ms per 3 s before, 75-150
    # after, and shorter full-collection pauses, which is what a p99 sees).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    bound = runner.addresses[0]
    if role is None:
        where = config.spool.path if config.spool.backend == "sqlite" else \
            f"postgres, schema {config.spool.postgres.schema_}"
        log.info("relay %s listening on http://%s:%s (spool %s, %d destinations)", __version__,
                 _host(bound[0]), bound[1], where, len(config.destinations))
    else:
        log.info("worker %d of %d (pid %d) serving on http://%s:%s%s", role.index, role.count,
                 os.getpid(), _host(bound[0]), bound[1], "" if delivers else " (ingest only: "
                 "worker 0 delivers from the SQLite spool)")

    if delivers:  # SQLite workers: worker 0 alone prunes; PostgreSQL takes turns by itself
        supervisor.spawn("prune", lambda: _prune_forever(spool, config.spool.retention))
    background: list[asyncio.Task[Any]] = []
    if config_path is not None:
        def apply(new: Loaded) -> None:
            apply_config(app, new.config, new.destinations)
            if dispatcher is not None:
                dispatcher.reconfigure(new.config, new.destinations)
            MASK.update(config_secrets(new.config))

        watcher = ConfigWatcher(
            config_path, config, apply,
            on_result=lambda ok: metrics.config_reloads.labels("success" if ok else "failure").inc(),
            load=lambda path: load(path, on_mint=metrics.mint_counter))
        supervisor.spawn("reload", watcher.watch)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: background.append(
                asyncio.create_task(watcher.reload("SIGHUP"))))
    if role is not None:   # listening, and SIGHUP handled: the supervisor may count on it
        say_ready(role)
    try:
        await stop.wait()
    finally:
        # Order matters: not ready first, then no new connections, then let in-flight
        # requests and attempts finish, then commit and close the spool.
        log.info("shutting down: draining for up to %.0fs", config.server.drain_timeout)
        app[STATE]["draining"] = True
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await runner.cleanup()
        if dispatcher is not None:
            await dispatcher.stop(config.server.drain_timeout)
        await supervisor.stop()
        # Said once: by the supervisor of SQLite workers after they all stopped.
        if role is None or (not sqlite and role.index == 0):
            await log_pending(spool, config)
        await spool.close()
        log.info("stopped")


async def _refresh_gauges(metrics: Metrics, dispatcher: Dispatcher) -> None:
    """server.workers > 1: keep this worker's attempt and host gauges current, whichever
    worker a scrape reaches (relay/metrics.py)."""
    while True:
        dispatch_gauges(metrics, dispatcher)
        await asyncio.sleep(1.0)


async def _prune_forever(spool: SpoolBackend, retention: float) -> None:
    while True:
        try:
            while (pruned := await spool.prune(retention)) > 0:
                log.info("pruned %d finished events older than spool.retention", pruned)
        except SpoolError as exc:  # the spool is busy or restarting: next round
            log.warning("pruning the spool failed (%s); will try again", exc)
        await asyncio.sleep(PRUNE_EVERY)


def _health_for(config: Config, spool: SpoolBackend) -> dict[str, Any]:
    """Host health shared through the database when the spool is PostgreSQL (several
    replicas may share it); otherwise the dispatcher keeps its own board."""
    if config.spool.backend != "postgres":
        return {}
    from relay.spool.postgres import PostgresSpool  # asyncpg: the optional extra

    assert isinstance(spool, PostgresSpool)
    return {"health": shared_health(spool, probe_lease=spool.lease, clock=time.time)}


async def _follow_other_replicas(spool: Any, wake: Callable[[], None]) -> None:
    """Wake the dispatcher when another replica stored events, recorded a retry, replayed or
    gave claims back at close (``work_mark``): otherwise a replica whose last look was complete
    would find that work only at its next recheck."""
    mark = None
    while True:
        try:
            seen = await spool.work_mark()
        except SpoolError:
            seen = mark
        if mark is not None and seen != mark:
            wake()
        mark = seen
        await asyncio.sleep(FOLLOW_EVERY)


FILES_RESERVED = 128  # open files kept for the spool, logs and the like


def _connection_cap(config: Config) -> int:
    """server.max_connections, within what the open-files limit allows: the soft limit (often
    1,024) is raised toward the hard one first. Past the cap a connection is answered 503 at
    once; past the limit it would not be accepted at all, and senders would hang."""
    need = config.server.max_connections + config.delivery.concurrency + FILES_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft >= need:
        return config.server.max_connections
    cap = max(1, soft - config.delivery.concurrency - FILES_RESERVED)
    log.warning("the open-files limit (%d) holds %d connections, not server.max_connections=%d: "
                "raise it (ulimit -n) for more", soft, cap, config.server.max_connections)
    return cap


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
