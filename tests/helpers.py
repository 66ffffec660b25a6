"""Real parts for tests: config files, a relay subprocess, an in-thread relay server."""

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
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
# The documented payload examples, copied from shared/fixtures so the repository tests itself;
# test_fixture_copies_match_shared fails if the copies drift from the originals.
FIXTURES = ROOT / "tests" / "fixtures"


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
        "delivery": {"allowed_ports": [80, 443, 9]},
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


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` has exited (gone, or a zombie nobody reaped yet) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            found = re.search(r"listening on (http://\S+)", text)
            if found:
                self.url = found.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"relay did not start within {timeout}s:\n{self.log()}")

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


async def start_stack(config: Any, aiohttp_client: Any) -> tuple[Any, Any, Any]:
    """Spool + dispatcher + the app under aiohttp's test client, in this loop; stop_stack ends it."""
    from relay.dispatch import Dispatcher
    from relay.server import create_app
    from relay.spool import Spool

    spool = Spool(config.spool.path, max_events=config.spool.max_events)
    await spool.open()
    dispatcher = Dispatcher(config, spool)
    await dispatcher.start()
    return await aiohttp_client(create_app(config, spool, dispatcher)), spool, dispatcher


async def stop_stack(spool: Any, dispatcher: Any, drain: float = 1.0) -> None:
    await dispatcher.stop(drain)
    await spool.close()
