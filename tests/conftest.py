"""Shared fixtures: receivers, a settable clock, and the in-loop relay stack."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import Config, load_config
from tests.helpers import Clock, Stack, write_config
from tests.pg import pg_dsn, pg_server  # noqa: F401 - the real PostgreSQL fixtures, for every test
from tests.receiver import Answer, Receiver


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    """Start receivers on demand (``receivers(Answer(503))``); all stop after the test, and
    after any stack made in it (``make_stack`` depends on this fixture)."""
    started: list[Receiver] = []

    def start(default: Answer | None = None) -> Receiver:
        receiver = Receiver(default).__enter__()
        started.append(receiver)
        return receiver

    yield start
    for receiver in reversed(started):
        receiver.__exit__(None, None, None)


@pytest.fixture
def receiver(receivers: Callable[..., Receiver]) -> Receiver:
    """One running receiver answering 200 unless told otherwise."""
    return receivers()


@pytest.fixture
def clock() -> Clock:
    """A clock at t=1000 that moves only when the test moves it."""
    return Clock()


@pytest.fixture
async def make_stack(tmp_path: Path, aiohttp_client: Any,
                     receivers: Callable[..., Receiver]) -> AsyncIterator[
                         Callable[..., Awaitable[Stack]]]:
    """``await make_stack(config=..., **sections)``: spool + dispatcher + app in this loop.

    Without ``config`` one is written from ``sections`` (see helpers.write_config), each
    stack on its own spool file. ``dispatch=False`` runs no dispatcher; ``clock`` and
    ``rand`` go to the Dispatcher. Every stack is stopped after the test.
    """
    made: list[Stack] = []

    async def make(config: Config | None = None, *, dispatch: bool = True,
                   **options: Any) -> Stack:
        dispatcher_options = {k: options.pop(k) for k in ("clock", "rand") if k in options}
        if config is None:
            if made:  # a second writer on one spool file is refused
                options["spool"] = {"path": str(tmp_path / f"spool{len(made)}.db"),
                                    **options.get("spool", {})}
            config = load_config(write_config(tmp_path, **options), env={})
        stack = await Stack.start(config, aiohttp_client, dispatch=dispatch,
                                  **dispatcher_options)
        made.append(stack)
        return stack

    yield make
    for stack in reversed(made):
        await stack.stop()
