"""``relay sink``: a small local receiver that prints every request it gets, and fails on demand.

For trying the relay out: it prints method, path, headers and the (pretty) JSON body, answers
200, and, given the relay's config, says whether each request's JWT or Standard Webhooks
signature verifies with the secret of the destination whose URL path matches. ``Rules`` make it
fail (a status, a share of 503s, a delay; for every path or per path prefix) so retries,
suspensions and dead letters can be seen; which answer a request gets is the pure ``answer``.
Given the config, a path no destination posts to (nor a rule names) is answered 404 saying
so (``unrouted``): an event posted to the sink's port instead of the relay's must not look
accepted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import hmac
import json
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from relay.config import Config, Destination, HmacAuth, JwtAuth, parse_duration
from relay.config.load import api_url
from relay.errors import RelayError
from relay.request import literal_head


class SinkError(RelayError):
    """The sink cannot start (its port is taken) or an option is wrong; one line for the user."""


@dataclass(frozen=True)
class Rules:
    """How the sink answers. Each mapping is path prefix -> value; the prefix ``""`` is every
    path, and the longest matching prefix wins."""

    status: dict[str, int] = field(default_factory=dict)
    fail_rate: dict[str, float] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)


def _pick(table: dict[str, Any], path: str) -> Any:
    match = max((p for p in table if path.startswith(p)), key=len, default=None)
    return table[match] if match is not None else None


def answer(rules: Rules, path: str, draw: float) -> tuple[int, float]:
    """(status, delay in seconds) for a request to ``path``; ``draw`` is a number in [0, 1)
    compared with the fail rate (a request fails with 503 when ``draw < rate``)."""
    status = _pick(rules.status, path) or 200
    rate = _pick(rules.fail_rate, path) or 0.0
    if status < 300 and draw < rate:
        status = 503
    return status, _pick(rules.delay, path) or 0.0


def parse_rules(status: list[str], fail_rate: list[str], delay: list[str]) -> Rules:
    """``--status 503``, ``--status /braze=503``, ``--fail-rate 0.5``, ``--delay 2s`` (each
    repeatable, optionally ``PATH=VALUE``) as Rules; SinkError naming the bad option."""
    def table(values: list[str], option: str, convert: Callable[[str], Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for value in values:
            prefix, _, text = value.rpartition("=")
            if prefix and not prefix.startswith("/"):
                raise SinkError(f"{option} {value!r}: a path starts with / (e.g. /braze=...)")
            try:
                out[prefix] = convert(text)
            except ValueError as exc:
                raise SinkError(f"{option} {value!r}: {exc}") from None
        return out

    def code(text: str) -> int:
        if not text.isdigit() or not 100 <= int(text) <= 599:
            raise ValueError("expected an HTTP status such as 503")
        return int(text)

    def rate(text: str) -> float:
        value = float(text)
        if not 0 <= value <= 1:
            raise ValueError("expected a share between 0 and 1 such as 0.5")
        return value

    return Rules(table(status, "--status", code), table(fail_rate, "--fail-rate", rate),
                 table(delay, "--delay", parse_duration))


def _path_prefixes(dest: Destination) -> list[str]:
    """The literal paths a destination's requests start with (its url's, and each template
    variant's own), decoded as aiohttp gives a request's path (``/my%20hook``: ``/my hook``)."""
    variants = dest.template.variants.values() if dest.template is not None else ()
    return [unquote(urlsplit(literal_head(url)).path) or "/"
            for url in [dest.url, *(v.url for v in variants if v.url)]]


# The relay's own API: what a request the relay was meant to get asks for
_RELAY_PATHS = ("/v1/", "/healthz", "/readyz", "/metrics")


def unrouted(config: Config, rules: Rules, path: str) -> str | None:
    """Why the sink answers 404 to ``path``: no destination of ``config`` posts there and no
    rule names it (None when one does). The relay's own paths get where the relay listens."""
    prefixes = list(dict.fromkeys(p for d in config.destinations for p in _path_prefixes(d)))
    named = [p for table in (rules.status, rules.fail_rate, rules.delay) for p in table if p]
    if any(path.startswith(p) for p in prefixes + named):
        return None
    if path.startswith(_RELAY_PATHS):
        relay = api_url(*config.server.host_port) + path
        return (f"this is relay sink, the test receiver, not the relay: the relay listens on "
                f"server.listen ({config.server.listen} in {config.source}), so send this to "
                f"{relay}")
    return (f"no destination of {config.source} posts to {path}: relay sink, the test "
            f"receiver, takes only its destinations' url paths ({', '.join(prefixes)})")


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


def sink_app(config: Config | None = None, out: TextIO = sys.stdout, rules: Rules | None = None,
             draw: Callable[[], float] = random.random) -> web.Application:
    # (the longest prefix first: /crm-fr/ is not /crm's)
    dests = sorted(((prefix, d) for d in (config.destinations if config else ())
                    for prefix in _path_prefixes(d)), key=lambda entry: -len(entry[0]))
    rules = rules or Rules()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        refused = unrouted(config, rules, request.path) if config is not None else None
        status, delay = (404, 0.0) if refused else answer(rules, request.path, draw())
        lines = [f"--- {request.method} {request.path_qs}"]
        lines += [f"{name}: {value}" for name, value in request.headers.items()]
        try:
            text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            text = body.decode("utf-8", errors="replace")
        lines.append("")
        lines.append(text)
        dest = next((d for prefix, d in dests if request.path.startswith(prefix)), None)
        if dest is not None:
            lines.append(f"=> destination {dest.name}: {verify(dest, dict(request.headers), body)}")
        lines.append(f"=> answered {status}" + (f" after {delay:g}s" if delay else "")
                     + (f": {refused}" if refused else ""))
        print("\n".join(lines) + "\n", file=out, flush=True)
        if refused:
            return web.json_response({"received": False, "error": refused}, status=404)
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"received": True, "status": status}, status=status)

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def run_sink(port: int, host: str = "127.0.0.1", config: Config | None = None,
                   rules: Rules | None = None) -> None:
    """Serve until SIGINT or SIGTERM; SinkError (one line) when the port cannot be had."""
    runner = web.AppRunner(sink_app(config, rules=rules), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise SinkError(f"port {port} on {host} is already in use (another relay sink, or "
                            f"make run, still running?): stop it, or start this one with "
                            f"--port N and point the destinations' urls at N") from None
        raise SinkError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = runner.addresses[0]
    print(f"relay sink listening on http://{host}:{bound[1]}{describe(rules)} (Ctrl-C to stop)",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def describe(rules: Rules | None) -> str:
    """``, answering /braze=503, fail-rate 0.5`` or nothing for a sink that always says 200."""
    if rules is None:
        return ""
    parts = [f"{p or ''}{'=' if p else ''}{v}" for p, v in rules.status.items()]
    parts += [f"fail-rate {p}{'=' if p else ''}{v:g}" for p, v in rules.fail_rate.items()]
    parts += [f"delay {p}{'=' if p else ''}{v:g}s" for p, v in rules.delay.items()]
    return f", answering {', '.join(parts)}" if parts else ""
