"""Process lifecycle: open the spool, serve HTTP, and shut down cleanly on SIGTERM/SIGINT.

Shutdown order matters for "nothing accepted is lost": readyz turns 503, the listener closes,
in-flight requests finish (their commits included) within ``server.drain_timeout``, then the
spool commits what is queued and closes. Background upkeep (pruning old records) runs here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from relay import __version__
from relay.config import Config
from relay.dispatch import Dispatcher
from relay.server import STATE, create_app
from relay.spool import Spool

log = logging.getLogger("relay")

PRUNE_EVERY = 3600.0


async def run(config: Config, *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    spool = Spool(config.spool.path, max_events=config.spool.max_events,
                  dedupe_window=config.spool.dedupe_window)
    await spool.open()
    dispatcher = Dispatcher(config, spool)
    await dispatcher.start()
    app = create_app(config, spool, dispatcher)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.drain_timeout,
                           handle_signals=False)
    await runner.setup()
    host, port = config.server.host_port
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await dispatcher.stop(0)
        await spool.close()
        raise SystemExit(f"relay: cannot listen on {config.server.listen}: {exc.strerror}") from exc
    bound = runner.addresses[0]
    log.info("relay %s listening on http://%s:%s (spool %s, %d destinations)",
             __version__, _host(bound[0]), bound[1], config.spool.path, len(config.destinations))
    pruner = asyncio.create_task(_prune_forever(spool, config.spool.retention))
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining for up to %.0fs", config.server.drain_timeout)
        app[STATE]["draining"] = True
        pruner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pruner
        await runner.cleanup()
        await dispatcher.stop(config.server.drain_timeout)
        await spool.close()
        log.info("stopped")


async def _prune_forever(spool: Spool, retention: float) -> None:
    while True:
        try:
            while (pruned := await spool.prune(retention)) > 0:
                log.info("pruned %d finished events older than spool.retention", pruned)
        except Exception:
            log.exception("pruning the spool failed; will try again")
        await asyncio.sleep(PRUNE_EVERY)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
