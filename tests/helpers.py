"""Real parts for tests: config files, a relay subprocess, an in-thread relay server, the
in-loop stack (spool + dispatcher + app), a settable clock, and ``eventually`` for waiting.

Fixtures built on these live in tests/conftest.py; everything here stays importable for
subprocess-based and synchronous (hypothesis) tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
# The documented payload examples, copied from shared/fixtures so the repository tests itself;
# test_fixture_copies_match_shared fails if the copies drift from the originals.
FIXTURES = ROOT / "tests" / "fixtures"

T = TypeVar("T")


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"not within {timeout}s: {what}; last value seen: {last!r}")


def eventually(get: Callable[[], T], until: Callable[[T], object] = bool, *, what: str = "",
               timeout: float = 15.0, interval: float = 0.02) -> T:
    """Call ``get`` every ``interval`` until ``until(value)`` holds, and return that value.

    The one way tests wait for something to happen: on timeout an AssertionError says what was
    awaited (``what``, else the callable's name) and the last value ``get`` returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what or getattr(get, "__qualname__", repr(get)), timeout, value)
        time.sleep(interval)


async def async_eventually(get: Callable[[], T | Awaitable[T]],
                           until: Callable[[T], object] = bool, *, what: str = "",
                           timeout: float = 15.0, interval: float = 0.02) -> T:
    """``eventually`` for async tests: ``get`` may be a coroutine function; waits without
    blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if isinstance(value, Awaitable):
            value = await value
        if until(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _timed_out(what or getattr(get, "__qualname__", repr(get)), timeout, value)
        await asyncio.sleep(interval)


class Clock:
    """A clock that stands still until a test moves it (``clock.now += 60``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def destinations(url: str = "http://127.0.0.1:9/") -> list[dict[str, Any]]:
    """One destination of each format, all pointing at ``url`` (port 9: nothing listens)."""
    return [
        {"name": "ajo", "format": "ajo", "url": url + "ajo", "allow_insecure_http": True,
         "ajo": {"ims_org": "myImsOrg",
                 "sandbox": {"id": "068abf40-575e-11ea-8512-9b1bfdb82603", "name": "prod"}}},
        {"name": "braze", "format": "braze", "url": url + "braze", "channels": ["email"]},
        {"name": "crm", "format": "template", "url": url + "crm",
         "template": {"method": "POST", "body": {"type": "json",
                                                  "fields": {"s": "{{ event.status }}"}}}},
    ]


def write_config(tmp_path: Path, **sections: Any) -> Path:
    """A config file in ``tmp_path`` with the spool there too; sections override defaults."""
    port = int(re.sub(r".*:", "", sections.get("server", {}).get("listen", ":0")))
    config: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "spool": {"path": str(tmp_path / "spool.db")},
        # the test receivers listen on loopback: an internal network, refused unless listed
        "delivery": {"allowed_ports": [80, 443, 9], "allowed_networks": ["127.0.0.0/8"]},
        "destinations": destinations(),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def process_gone(pid: int) -> bool:
    """True if ``pid`` has exited (gone, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def event(i: int = 0, **fields: Any) -> dict[str, Any]:
    base = {"id": f"evt-{i}", "channel": "email", "status": "delivered",
            "message_id": f"msg-{i}", "recipient": {"email": f"user{i}@example.com"}}
    return {**base, **fields}


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
    """A plain blocking HTTP call; returns (status, headers, parsed JSON or text)."""
    data = None
    headers = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, resp_headers, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, resp_headers, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, resp_headers, json.loads(raw)
    except ValueError:
        return status, resp_headers, raw.decode(errors="replace")


class RelayProcess:
    """``relay serve`` in a subprocess; its log goes to a file that tests can read."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None):
        self.config_path = config_path
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> RelayProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.config_path.parent)
        log.close()
        proc = self.proc

        def listening() -> str | None:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            found = re.search(r"listening on (http://\S+)", text)
            if found:
                return found.group(1)
            if proc.poll() is not None:
                raise RuntimeError(f"relay exited with {proc.returncode}:\n{text}")
            return None

        try:
            self.url = eventually(listening, what="the relay to log 'listening on'",
                                  timeout=timeout)
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(f"relay did not start: {exc}\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def writer_pid(self) -> int:
        """The pid of the relay's spool writer process (its one child)."""
        assert self.proc is not None
        (child,) = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(child)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class LoopThread:
    """A server with its own event loop in a background thread; ``_serve`` runs until exit.

    For synchronous tests (hypothesis, subprocess tests) that need a live local server.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):  # type: ignore[no-untyped-def]
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        await self._serve(self._ready, self._stop)

    async def _serve(self, ready: threading.Event, stop: asyncio.Event) -> None:
        raise NotImplementedError


class ServerThread(LoopThread):
    """The relay's aiohttp app on a real socket (no dispatcher), served from a thread."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.url = ""

    async def _serve(self, ready: threading.Event, stop: asyncio.Event) -> None:
        from aiohttp import web

        from relay.server import create_app
        from relay.spool import Spool

        self.spool = Spool(self.config.spool.path, max_events=self.config.spool.max_events)
        await self.spool.open()
        runner = web.AppRunner(create_app(self.config, self.spool), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        ready.set()
        await stop.wait()
        await runner.cleanup()
        await self.spool.close()


def served(app: Any) -> Any:
    """aiohttp's TestServer for ``app`` with the relay's ingest shortcut in front of it, as
    relay/service.py serves it (relay.server.ingest_shortcut): tests of the API go through
    the path production requests take."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from relay.server import ingest_shortcut

    class Runner(web.AppRunner):
        async def _make_server(self) -> web.Server:
            server = await super()._make_server()
            server.request_handler = ingest_shortcut(self.app, server.request_handler)
            return server

    class Server(TestServer):
        async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
            return Runner(self.app, **kwargs)

    return Server(app)


class Stack:
    """Spool + dispatcher + the relay's app under aiohttp's test client, all in the test's loop
(behind the ingest shortcut, as the relay serves it: ``served``).

    Start one with ``Stack.start`` (or the ``make_stack`` fixture, which also stops it).
    """

    def __init__(self, config: Any, client: Any, spool: Any, dispatcher: Any) -> None:
        self.config, self.client, self.spool, self.dispatcher = config, client, spool, dispatcher
        self._stopped = False

    @classmethod
    async def start(cls, config: Any, aiohttp_client: Any, *, dispatch: bool = True,
                    **dispatcher_options: Any) -> Stack:
        """``dispatch=False`` serves the API on the spool with no dispatcher running;
        ``dispatcher_options`` (``clock``, ``rand``) go to the Dispatcher."""
        from relay.dispatch import Dispatcher
        from relay.server import create_app
        from relay.spool import Spool

        spool = Spool(config.spool.path, max_events=config.spool.max_events)
        await spool.open()
        dispatcher = None
        if dispatch:
            dispatcher = Dispatcher(config, spool, **dispatcher_options)
            spool.on_wake = dispatcher.wake   # as relay/service.py wires it
            await dispatcher.start()
            client = await aiohttp_client(served(create_app(config, spool, dispatcher)))
        else:
            client = await aiohttp_client(served(create_app(config, spool)))
        return cls(config, client, spool, dispatcher)

    async def stop(self, drain: float = 1.0) -> None:
        """Stop the dispatcher (letting attempts finish for ``drain`` s), close the spool."""
        if self._stopped:
            return
        self._stopped = True
        if self.dispatcher is not None:
            await self.dispatcher.stop(drain)
        await self.spool.close()

    async def post(self, *events: dict[str, Any]) -> dict[str, str]:
        """POST the events (expecting 202); ``"<event id>/<destination>" -> delivery id``."""
        resp = await self.client.post("/v1/events", json=list(events))
        assert resp.status == 202, await resp.text()
        body = await resp.json()
        return {f"{e['id']}/{d['destination']}": d["delivery_id"]
                for e in body["events"] for d in e["deliveries"]}

    async def delivery(self, delivery_id: str) -> dict[str, Any]:
        resp = await self.client.get(f"/v1/deliveries/{delivery_id}")
        return await resp.json()

    async def settle(self, delivery_id: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the delivery is in ``state``; returns its record."""
        return await async_eventually(lambda: self.delivery(delivery_id),
                                      lambda found: found["status"] == state,
                                      what=f"{delivery_id} to become {state}", timeout=timeout)
