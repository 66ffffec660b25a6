"""``relay sink``: a small local receiver that prints every request it gets.

For trying the relay out: it prints method, path, headers and the (pretty) JSON body, answers
200, and, given the relay's config, says whether each request's JWT or Standard Webhooks
signature verifies with the secret of the destination whose URL path matches.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
from typing import Any, TextIO
from urllib.parse import urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from relay.config import Config, Destination, HmacAuth, JwtAuth


def _path_prefix(dest: Destination) -> str:
    path = urlsplit(dest.url.split("{{", 1)[0].split("{%", 1)[0]).path
    return path or "/"


def verify(dest: Destination, headers: dict[str, str], body: bytes) -> str:
    """A one-line verdict on the request's signature for this destination."""
    auth = dest.auth
    if isinstance(auth, HmacAuth):
        secrets = ([auth.secret] if auth.secret else []) + list(auth.secrets)
        wid, ts = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
        given = {part.split(",", 1)[-1] for part in headers.get("webhook-signature", "").split()}
        for secret in secrets:
            raw = base64.b64decode(secret.get_secret_value().removeprefix("whsec_"))
            mac = hmac.new(raw, f"{wid}.{ts}.".encode() + body, hashlib.sha256).digest()
            if base64.b64encode(mac).decode() in given:
                return "HMAC signature: valid (Standard Webhooks)"
        return "HMAC signature: INVALID"
    if isinstance(auth, JwtAuth):
        value = headers.get(auth.header, "")
        token = value.removeprefix(f"{auth.scheme} ") if auth.scheme else value
        key: Any = auth.key.get_secret_value()
        if not auth.algorithm.startswith("HS"):
            key = load_pem_private_key(key.encode(), None).public_key()  # verify with its public half
        try:
            claims = jwt.decode(token, key, algorithms=[auth.algorithm], audience=auth.audience,
                                issuer=auth.issuer)
        except jwt.PyJWTError as exc:
            return f"JWT: INVALID ({exc})"
        return f"JWT: valid (sub={claims.get('sub')}, exp in {claims['exp'] - claims['iat']}s)"
    return f"auth: {auth.type}"


def sink_app(config: Config | None = None, out: TextIO = sys.stdout) -> web.Application:
    dests = sorted(config.destinations if config else (), key=lambda d: -len(_path_prefix(d)))

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        lines = [f"--- {request.method} {request.path_qs}"]
        lines += [f"{name}: {value}" for name, value in request.headers.items()]
        try:
            text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            text = body.decode("utf-8", errors="replace")
        lines.append("")
        lines.append(text)
        dest = next((d for d in dests if request.path.startswith(_path_prefix(d))), None)
        if dest is not None:
            lines.append(f"=> destination {dest.name}: {verify(dest, dict(request.headers), body)}")
        print("\n".join(lines) + "\n", file=out, flush=True)
        return web.json_response({"received": True})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def run_sink(port: int, host: str = "127.0.0.1", config: Config | None = None) -> None:
    print(f"relay sink listening on http://{host}:{port} (Ctrl-C to stop)", flush=True)
    web.run_app(sink_app(config), host=host, port=port, access_log=None, print=None)
