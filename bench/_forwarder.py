"""The baseline: a minimal non-durable forwarder (aiohttp + uvloop). It parses the posted
events, answers 202 and forwards each one from memory (64 at a time). A crash loses everything
in flight: this is the speed the relay's durability is compared against."""

import asyncio
import json
import sys

import uvloop
from aiohttp import ClientSession, TCPConnector, web

TARGET = sys.argv[2]
limit = asyncio.Semaphore(64)
tasks: set[asyncio.Task[None]] = set()


async def forward(event: dict, session: ClientSession) -> None:
    async with limit:
        body = json.dumps({"dispatch_id": event["message_id"], "status": event["status"]})
        async with session.post(TARGET, data=body,
                                headers={"Content-Type": "application/json"}) as resp:
            await resp.read()


async def ingest(request: web.Request) -> web.Response:
    events = json.loads(await request.read())
    for event in events if isinstance(events, list) else [events]:
        task = asyncio.create_task(forward(event, request.app["session"]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return web.json_response({"accepted": True}, status=202)


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app["session"] = ClientSession(connector=TCPConnector(limit=64))
    yield
    await app["session"].close()


app = web.Application()
app.cleanup_ctx.append(session_ctx)
app.router.add_post("/v1/events", ingest)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
