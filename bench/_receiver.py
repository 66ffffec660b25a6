"""A fast receiver for benchmarks: counts POSTs and answers with the current mode's status.

GET /count -> {"count", "ok", "first_ok", "last_ok"}; POST /mode?status=503 changes the answer
(and ?delay=5 makes each answer wait that many seconds: a slow receiver).
"""

import asyncio
import sys
import time

import uvloop
from aiohttp import web

stats = {"count": 0, "ok": 0, "first_ok": None, "last_ok": None}
mode = {"status": int(sys.argv[2]) if len(sys.argv) > 2 else 200, "delay": 0.0}


async def receive(request: web.Request) -> web.Response:
    await request.read()
    stats["count"] += 1
    if mode["status"] < 300:
        now = time.time()
        stats["ok"] += 1
        stats["first_ok"] = stats["first_ok"] or now
        stats["last_ok"] = now
    if mode["delay"]:
        await asyncio.sleep(mode["delay"])
    return web.Response(status=mode["status"], text="ok")


async def report(request: web.Request) -> web.Response:
    return web.json_response(stats)


async def set_mode(request: web.Request) -> web.Response:
    mode["status"] = int(request.query.get("status", mode["status"]))
    mode["delay"] = float(request.query.get("delay", mode["delay"]))
    return web.json_response(mode)


app = web.Application()
app.router.add_get("/count", report)
app.router.add_post("/mode", set_mode)
app.router.add_post("/{tail:.*}", receive)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
