"""Supervision of the relay's long-lived tasks: one that fails is logged, counted, restarted.

A task that raises (anything but cancellation) is logged once with its traceback, counted in
``relay_task_restarts_total{task}``, marked down (``/readyz`` answers 503 naming it), and
started again after a backoff that doubles from ``RESTART_FIRST`` up to ``RESTART_MAX``
seconds and resets once a run has lasted ``RESTART_MAX``. A task that returns has finished
and is not restarted. Sleeping and the clock are injected, so tests need no real waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("relay.supervise")

RESTART_FIRST = 0.5
RESTART_MAX = 30.0


class Supervisor:
    """Runs named tasks, restarting each one that fails; see the module docstring."""

    def __init__(self, on_restart: Callable[[str], None] = lambda name: None, *,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._on_restart = on_restart
        self._sleep = sleep
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.down: dict[str, str] = {}   # task name -> why it is not running now
        self.restarts: dict[str, int] = {}

    def spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Start ``run()`` as the supervised task ``name``."""
        task = asyncio.create_task(self._keep(name, run), name=f"relay-{name}")
        self._tasks[name] = task
        return task

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        delay = RESTART_FIRST
        while True:
            began = self._clock()
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._clock() - began >= RESTART_MAX:
                    delay = RESTART_FIRST  # it ran well for a while: a fresh failure
                self.down[name] = f"{type(exc).__name__}: {exc}"
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._on_restart(name)
                log.exception("task %s failed; restarting it in %.1fs", name, delay,
                              extra={"task": name})
            await self._sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            self.down.pop(name, None)
            log.warning("task %s restarted", name, extra={"task": name})

    async def stop(self) -> None:
        """Cancel every task and wait for them."""
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
