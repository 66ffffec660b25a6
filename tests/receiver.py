"""A real HTTP receiver on 127.0.0.1, port 0, in its own thread, that fails on demand.

Each request gets the next scripted answer (status, headers, body, delay); when the script
runs out, ``default`` answers. Every request is recorded with method, path, headers and body.
Usable from sync and async tests alike.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.helpers import LoopThread, async_eventually, eventually


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"
    delay: float = 0.0
    echo: bool = False  # the body is the request's headers as JSON (as test endpoints answer)


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]  # case-insensitive, as HTTP headers are
    body: bytes
    at: float
    status: int = 0  # what the receiver answered


class Receiver(LoopThread):
    def __init__(self, default: Answer | None = None) -> None:
        super().__init__()
        self.default = default or Answer()
        self.script: list[Answer] = []
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, *answers: Answer) -> None:
        with self.lock:
            self.script.extend(answers)

    def set_default(self, answer: Answer) -> None:
        with self.lock:
            self.default = answer

    def received(self, path_prefix: str = "") -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]

    def wait_for(self, count: int, path_prefix: str = "", timeout: float = 15.0) -> list[Received]:
        """Block until at least ``count`` requests to ``path_prefix`` arrived; returns them."""
        return eventually(lambda: self.received(path_prefix), lambda got: len(got) >= count,
                          what=f"{count} requests to {path_prefix!r}", timeout=timeout)

    async def await_for(self, count: int, path_prefix: str = "",
                        timeout: float = 15.0) -> list[Received]:
        """``wait_for`` without blocking the event loop."""
        return await async_eventually(lambda: self.received(path_prefix),
                                      lambda got: len(got) >= count,
                                      what=f"{count} requests to {path_prefix!r}",
                                      timeout=timeout)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self.lock:
            answer = self.script.pop(0) if self.script else self.default
            self.requests.append(Received(request.method, request.path_qs,
                                          CIMultiDict(request.headers), body, time.time(),
                                          answer.status))
        if answer.delay:
            await asyncio.sleep(answer.delay)
        text = json.dumps(dict(request.headers)) if answer.echo else answer.body
        return web.Response(status=answer.status, headers=answer.headers, text=text)

    async def _serve(self, ready: threading.Event, stop: asyncio.Event) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        ready.set()
        await stop.wait()
        await runner.cleanup()


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receiver_config(receiver: Receiver, **overrides: Any) -> dict[str, Any]:
    """Config sections pointing one destination of each format at the receiver."""
    url = receiver.url
    return {
        "delivery": {"allowed_ports": [80, 443, receiver.port], "backoff_initial": "50ms",
                     "allowed_networks": ["127.0.0.0/8"],
                     "backoff_max": "200ms", "timeout": "2s", **overrides.pop("delivery", {})},
        "destinations": overrides.pop("destinations", None) or [
            {"name": "ajo", "format": "ajo", "url": f"{url}/ajo", "allow_insecure_http": True,
             "ajo": {"ims_org": "myImsOrg", "sandbox": {"id": "sb-1", "name": "prod"}},
             "auth": {"type": "jwt", "algorithm": "HS256", "key": "k" * 40, "audience": "ajo"}},
            {"name": "braze", "format": "braze", "url": f"{url}/braze", "channels": ["email"],
             "auth": {"type": "hmac", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}},
            {"name": "crm", "format": "template",
             "url": url + "/crm/{{ event.message_id | url_encode }}",
             "allowed_hosts": ["127.0.0.1"], "headers": {"Authorization": "Bearer crm-token"},
             "template": {"method": "PUT", "body": {"type": "json", "fields": {
                 "status": "{{ event.status }}"}}}},
        ],
        **overrides,
    }
