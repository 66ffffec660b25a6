"""The ingest shortcut (relay.server.ingest_shortcut): a POST /v1/events skips aiohttp's
router and middleware chain, and every request is answered exactly as the routed app answers it.

Two listeners are served side by side in the test's loop, each with the relay's own ``Runner``
on its own spool, one with the shortcut and one without, and they get the same raw requests:
every status line, header (but ``Date``) and body (delivery ids masked: they are drawn per spool
file) must be the same. The shortcut is also checked to be taken: the router is never asked for
what it serves.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.config import load_config
from relay.listener import Runner
from relay.server import create_app, ingest_shortcut
from relay.spool import Spool
from tests.helpers import event, write_config

EVENT = json.dumps(event(1)).encode()
BATCH = json.dumps([event(2), event(3)]).encode()


def post(path: str, body: bytes, *headers: str,
         content_type: str = "application/json") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: relay", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def bare(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n".encode()


# Each request goes to both listeners in this order: the spool's state (duplicates) matters.
REQUESTS: dict[str, bytes] = {
    "one event": post("/v1/events", EVENT),
    "a batch": post("/v1/events", BATCH),
    "the same event again (200, duplicate)": post("/v1/events", EVENT),
    "a query string": post("/v1/events?source=test", json.dumps(event(4)).encode()),
    "not JSON": post("/v1/events", b"{not json"),
    "an invalid event": post("/v1/events", b'{"id": "x", "channel": "pigeon"}'),
    "an empty array": post("/v1/events", b"[]"),
    "a JSON string": post("/v1/events", b'"event"'),
    "not UTF-8": post("/v1/events", b'{"id": "\xff"}'),
    "a text body": post("/v1/events", EVENT, content_type="text/plain"),
    "a +json type": post("/v1/events", json.dumps(event(5)).encode(),
                         content_type="application/vnd.relay+json"),
    "a body over max_body_bytes": post("/v1/events", b"[" + b" " * 5000 + b"]"),
    "a Content-Length over the limit, no body sent": post("/v1/events", b"")
    .replace(b"Content-Length: 0", b"Content-Length: 999999"),
    "Expect: 100-continue": post("/v1/events", json.dumps(event(6)).encode(),
                                 "Expect: 100-continue"),
    "Expect: something else": post("/v1/events", EVENT, "Expect: fancy"),
    "a traceparent": post("/v1/events", json.dumps(event(7)).encode(),
                          "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    "GET /v1/events (405)": bare("GET", "/v1/events"),
    "HEAD /v1/events": bare("HEAD", "/v1/events"),
    "PUT /v1/events": post("/v1/events", EVENT).replace(b"POST", b"PUT", 1),
    "a trailing slash (404)": post("/v1/events/", EVENT),
    "an encoded slash (404, as the router sees it)": post("/v1%2Fevents", EVENT),
    "an encoded letter": post("/v1/%65vents", json.dumps(event(8)).encode()),
    "upper case (404)": post("/V1/EVENTS", EVENT),
    "another path": bare("GET", "/healthz"),
}

AUTH = "Authorization: Bearer s3cret-token"
WITH_TOKEN: dict[str, bytes] = {
    "no token (401)": post("/v1/events", EVENT),
    "a wrong token (401)": post("/v1/events", EVENT, "Authorization: Bearer nope"),
    "another scheme (401)": post("/v1/events", EVENT, "Authorization: Basic czNjcmV0"),
    "the token": post("/v1/events", json.dumps(event(9)).encode(), AUTH),
    "the token, Expect: 100-continue": post("/v1/events", json.dumps(event(10)).encode(), AUTH,
                                            "Expect: 100-continue"),
    "no token, Expect: 100-continue (401 at once)": post("/v1/events", EVENT,
                                                         "Expect: 100-continue"),
}

NOT_ALLOWED: dict[str, bytes] = {
    "an address outside allow_cidrs (403)": post("/v1/events", EVENT),
    "the probe stays open": bare("GET", "/healthz"),
}


def router_asked(app: web.Application) -> list[str]:
    """The paths ``app``'s router is asked to resolve from now on, as they come."""
    resolved: list[str] = []
    resolve = app.router.resolve

    async def counting(request: web.Request) -> Any:
        resolved.append(request.path)
        return await resolve(request)

    app.router.resolve = counting  # type: ignore[method-assign]
    return resolved


@asynccontextmanager
async def listener(tmp_path: Path, shortcut: bool, **sections: Any
                   ) -> AsyncIterator[tuple[int, list[str]]]:
    """The relay's app on 127.0.0.1 behind its own Runner; yields the port and the paths the
    router was asked to resolve."""
    config = load_config(write_config(tmp_path, **sections), env={})
    spool = Spool(config.spool.path, max_events=config.spool.max_events)
    await spool.open()
    app = create_app(config, spool)
    resolved = router_asked(app)
    runner = Runner(app, config, shortcut=ingest_shortcut if shortcut else None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], resolved
    finally:
        await runner.cleanup()
        await spool.close()


async def exchange(port: int, request: bytes) -> list[Any]:
    """Send ``request`` on a new connection; each response it gets (a 100 Continue first,
    maybe) as (status line, headers but Date, body with delivery ids masked: they are drawn
    per spool file). Read by Content-Length, not to EOF: a server that refused a body it did
    not read may keep the connection until its timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    found: list[Any] = []
    try:
        writer.write(request)
        await writer.drain()
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status, *lines = head.decode().rstrip("\r\n").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines)
            headers.pop("Date", None)
            size = int(headers.get("Content-Length", "0"))
            body = b"" if request.startswith(b"HEAD") else \
                await asyncio.wait_for(reader.readexactly(size), 10)
            found.append((status, headers, re.sub(rb"dlv_[0-9a-f]{31}", b"dlv_", body)))
            if " 100 " not in status:
                return found
    finally:
        writer.close()


async def compare(tmp_path: Path, requests: dict[str, bytes], **sections: Any
                  ) -> tuple[list[str], list[str], dict[str, list[Any]]]:
    async with listener(tmp_path / "routed", False, **sections) as (routed, routed_paths), \
            listener(tmp_path / "short", True, **sections) as (short, short_paths):
        answers: dict[str, list[Any]] = {}
        for what, request in requests.items():
            expected = await exchange(routed, request)
            got = await exchange(short, request)
            assert got == expected, what
            answers[what] = got
    return routed_paths, short_paths, answers


def statuses(answers: dict[str, list[Any]]) -> dict[str, list[str]]:
    return {what: [status.split(" ")[1] for status, _, _ in found]
            for what, found in answers.items()}


def dirs(tmp_path: Path) -> Callable[[str], Path]:
    def make(name: str) -> Path:
        (tmp_path / name / "routed").mkdir(parents=True)
        (tmp_path / name / "short").mkdir(parents=True)
        return tmp_path / name
    return make


async def test_the_shortcut_answers_every_request_as_the_router_does(tmp_path: Path) -> None:
    make = dirs(tmp_path)
    routed_paths, short_paths, answers = await compare(
        make("plain"), REQUESTS, server={"max_body_bytes": 4096})
    assert statuses(answers) == {
        "one event": ["202"], "a batch": ["202"],
        "the same event again (200, duplicate)": ["200"], "a query string": ["202"],
        "not JSON": ["400"], "an invalid event": ["400"], "an empty array": ["400"],
        "a JSON string": ["400"], "not UTF-8": ["400"], "a text body": ["415"],
        "a +json type": ["202"], "a body over max_body_bytes": ["413"],
        "a Content-Length over the limit, no body sent": ["413"],
        "Expect: 100-continue": ["100", "202"], "Expect: something else": ["417"],
        "a traceparent": ["202"], "GET /v1/events (405)": ["405"],
        "HEAD /v1/events": ["405"], "PUT /v1/events": ["405"],
        "a trailing slash (404)": ["404"],
        "an encoded slash (404, as the router sees it)": ["404"],
        "an encoded letter": ["202"], "upper case (404)": ["404"], "another path": ["200"],
    }
    # The router served every request of the routed listener; of the shortcut's, only those
    # that are not a plain POST /v1/events (an Expect it does not understand is answered
    # before the router, on every path).
    assert len(routed_paths) == len(REQUESTS)
    assert short_paths == ["/v1/events", "/v1/events", "/v1/events", "/v1/events",
                           "/v1/events/", "/v1/events", "/V1/EVENTS", "/healthz"]

    token_routed, token_short, answers = await compare(
        make("token"), WITH_TOKEN, server={"token": "s3cret-token"})
    assert statuses(answers) == {
        "no token (401)": ["401"], "a wrong token (401)": ["401"],
        "another scheme (401)": ["401"], "the token": ["202"],
        "the token, Expect: 100-continue": ["100", "202"],
        "no token, Expect: 100-continue (401 at once)": ["401"],
    }
    assert len(token_short) == 2 and len(token_routed) == len(WITH_TOKEN)

    _, _, answers = await compare(make("cidrs"), NOT_ALLOWED,
                                  server={"allow_cidrs": ["10.0.0.0/8"]})
    assert statuses(answers) == {"an address outside allow_cidrs (403)": ["403"],
                                 "the probe stays open": ["200"]}


async def test_the_api_tests_stack_serves_ingest_through_the_shortcut(make_stack: Any) -> None:
    """tests.helpers.Stack (most API tests) serves the app as the relay does: an ingest does
    not reach aiohttp's router, other requests do."""
    stack = await make_stack(dispatch=False)
    app = stack.client.server.app
    resolved = router_asked(app)
    assert (await stack.client.post("/v1/events", json=event(1))).status == 202
    assert (await stack.client.get("/healthz")).status == 200
    assert resolved == ["/healthz"]
