"""A fast receiver for benchmarks: counts POSTs, answers 200; GET /count reports the total."""

import sys

import uvloop
from aiohttp import web

count = 0


async def receive(request: web.Request) -> web.Response:
    global count
    await request.read()
    count += 1
    return web.Response(text="ok")


async def report(request: web.Request) -> web.Response:
    return web.json_response({"count": count})


app = web.Application()
app.router.add_get("/count", report)
app.router.add_post("/{tail:.*}", receive)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
