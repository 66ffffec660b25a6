"""A fast receiver for bench/latency.py: answers 200 and records when each delivery arrived.

Each POST body is a JSON object whose ``dispatch_id`` (the braze shape, and the forwarder's) is
the sent event's ``message_id``; its arrival is ``time.monotonic_ns()`` taken as soon as the body
has been read, before parsing. CLOCK_MONOTONIC is one clock for every process on a Linux machine,
so the load generator compares it with the time it started each POST.

GET /count -> {"count": distinct ids, "posts": POSTs}; GET /arrivals -> {"arrivals": {id: ns},
"duplicates": n}; POST /reset forgets everything.
"""

import json
import sys
import time

import uvloop
from aiohttp import web

arrivals: dict[str, int] = {}
state = {"posts": 0, "duplicates": 0, "unreadable": 0}


async def receive(request: web.Request) -> web.Response:
    body = await request.read()
    now = time.monotonic_ns()
    state["posts"] += 1
    try:
        key = json.loads(body)["dispatch_id"]
    except (ValueError, KeyError, TypeError):
        state["unreadable"] += 1
        return web.Response(text="ok")
    if key in arrivals:  # at-least-once: the first arrival is the one that counts
        state["duplicates"] += 1
    else:
        arrivals[key] = now
    return web.Response(text="ok")


async def count(request: web.Request) -> web.Response:
    return web.json_response({"count": len(arrivals), **state})


async def report(request: web.Request) -> web.Response:
    return web.json_response({"arrivals": arrivals, **state})


async def reset(request: web.Request) -> web.Response:
    arrivals.clear()
    for key in state:
        state[key] = 0
    return web.json_response({"reset": True})


app = web.Application()
app.router.add_get("/count", count)
app.router.add_get("/arrivals", report)
app.router.add_post("/reset", reset)
app.router.add_post("/{tail:.*}", receive)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
