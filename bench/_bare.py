"""The ceiling: aiohttp on uvloop answering 202 to POST /v1/events after parsing its JSON (as
issue 21 defines it), without validating or storing anything."""

import json
import sys

import uvloop
from aiohttp import web


async def ingest(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.json_response({"events": []}, status=202)


app = web.Application(client_max_size=1 << 22)
app.router.add_post("/v1/events", ingest)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
