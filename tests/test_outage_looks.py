"""While the spool cannot be read, the dispatcher tries a look about once a second, however
often it is woken. Each ingest that fails in an outage wakes it (the writer may have committed
the events before it failed to answer): before, every such request cost a look too, so a
sender retrying fast against a PostgreSQL outage made the relay try as many reads as it got
requests. Real SQLite spool, real Dispatcher; its reads fail on demand."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from relay.config import load_config
from relay.dispatch import Dispatcher
from relay.errors import SpoolError
from relay.spool import Spool
from tests.helpers import write_config


async def test_wake_ups_during_a_read_outage_do_not_each_cost_a_look(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, destinations=[
        {"name": "a", "format": "braze", "url": "https://a.example.com/hook"}]), env={})
    spool = Spool(config.spool.path)
    await spool.open()
    tries: list[float] = []
    down = True
    poll = spool.poll

    async def failing(*args: Any, **kwargs: Any) -> Any:
        tries.append(time.monotonic())
        if down:
            raise SpoolError("the spool is down (test)")
        return await poll(*args, **kwargs)

    spool.poll = failing  # type: ignore[method-assign]
    dispatcher = Dispatcher(config, spool)
    await dispatcher.start()
    try:
        start = time.monotonic()
        while time.monotonic() - start < 2.0:   # a failed ingest every 10 ms
            dispatcher.wake()
            await asyncio.sleep(0.01)
        assert 1 <= len(tries) <= 4, f"{len(tries)} reads tried in 2 s of outage"
        down = False   # back: the next look comes within the second, and reads
        seen = len(tries)
        await asyncio.sleep(1.3)
        assert len(tries) > seen
        assert dispatcher.not_ready() is None
    finally:
        stopping = time.monotonic()
        await dispatcher.stop(1)
        assert time.monotonic() - stopping < 0.5   # the wait does not hold up a stop
        await spool.close()
