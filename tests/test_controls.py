"""Destination controls against real local parts: rate limits, mTLS, an egress proxy, OAuth2
client credentials and OpenTelemetry spans (docs/controls.md)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay import tracing
from relay.config import load_config
from relay.destinations import compile_destinations
from relay.errors import ConfigError
from tests.helpers import async_eventually, event, write_config
from tests.receiver import Receiver, receiver_config

# -- certificates --------------------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(subject: str, key: Any, issuer: tuple[str, Any] | None, *, ca: bool = False,
          san: list[x509.GeneralName] | None = None, client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(_name(issuer_name)).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: Any) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate."""
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("relay test CA", ca_key, None, ca=True)
    server = _cert("localhost", server_key, ("relay test CA", ca_key), san=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("relay-client", client_key, ("relay test CA", ca_key), client=True)
    ca_file, _ = _write(tmp_path / "ca", ca, ca_key)
    server_cert, server_key_file = _write(tmp_path / "server", server, server_key)
    client_cert, client_key_file = _write(tmp_path / "client", client, client_key)
    return {"ca": ca_file, "server_cert": server_cert, "server_key": server_key_file,
            "client_cert": client_cert, "client_key": client_key_file}


class Server:
    """An aiohttp server in the test's loop that records requests (and client certificates)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answer: Callable[[web.Request], web.Response] = lambda _r: web.Response(text="ok")
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        self.requests.append({"path": request.path, "headers": dict(request.headers),
                              "body": await request.read(), "peercert": peer})
        return self.answer(request)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(ssl_context: ssl.SSLContext | None = None) -> Server:
        server = Server()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", server.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        server.port = runner.addresses[0][1]
        runners.append(runner)
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


def _mtls_server_context(pki: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _one(url: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"delivery": {"allowed_ports": [80, 443, port], "allowed_networks": ["127.0.0.0/8"],
                         "backoff_initial": "50ms", "backoff_max": "200ms", "timeout": "3s",
                         **extra.pop("delivery", {})},
            "destinations": [{"name": "dest", "format": "braze", "url": url, **extra}]}


# -- rate limit ----------------------------------------------------------------------------


async def test_rate_limit_holds_arrivals_within_the_bucket(make_stack: Any,
                                                           receiver: Receiver) -> None:
    """500 events at 50/s, burst 100: every window of w seconds sees at most 100 + 50 w
    arrivals, none fails, each is one attempt, and /v1/hosts and metrics show the holding."""
    rate, burst = 50, 100
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze",
         "rate_limit": {"per_second": rate, "burst": burst}}], server={"max_batch": 500}))
    posted = time.time()
    ids = await stack.post(*(event(i) for i in range(500)))
    got = await receiver.await_for(500, "/braze", timeout=60)
    times = sorted(r.at for r in got)
    for n, at in enumerate(times, 1):  # no attempt starts before the post: a strict bound
        assert n <= burst + rate * (at - posted), n
    # Between two arrivals the bucket bounds the starts; an arrival trails its start by the
    # connection's latency, which differs between requests (a new connection is slower, the
    # machine is shared): allow 250 ms of it.
    jitter = 0.25
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - start + jitter), (i, j)
    for delivery_id in list(ids.values())[::50]:
        found = await stack.settle(delivery_id, "delivered")
        assert found["attempt_count"] == 1
    hosts = (await (await stack.client.get("/v1/hosts")).json())["hosts"]
    (entry,) = [h for h in hosts if "braze" in h["destinations"]]
    assert entry["state"] == "healthy"
    assert entry["rate_limit"]["braze"]["limited"] > 0
    metrics = stack.dispatcher.metrics.render().decode()
    assert 'relay_deliveries_total{destination="braze",outcome="limited"}' in metrics
    assert 'relay_deliveries_total{destination="braze",outcome="failed"} 0.0' in metrics
    assert 0 < entry["rate_limit"]["braze"]["limited"] <= 500


# -- mTLS ----------------------------------------------------------------------------------


async def test_mtls_presents_the_client_certificate(make_stack: Any, serve: Any,
                                                   pki: dict[str, str]) -> None:
    """A receiver that requires a client certificate gets the configured one."""
    server = await serve(_mtls_server_context(pki))
    stack = await make_stack(**_one(f"https://localhost:{server.port}/hook", server.port, tls={
        "cert_file": pki["client_cert"], "key_file": pki["client_key"], "ca_file": pki["ca"]}))
    ids = await stack.post(event(1))
    await stack.settle(ids["evt-1/dest"], "delivered")
    (got,) = server.requests
    subject = dict(part[0] for part in got["peercert"]["subject"])
    assert subject["commonName"] == "relay-client"


async def test_mtls_without_a_client_certificate_fails_with_a_tls_reason(
        make_stack: Any, serve: Any, pki: dict[str, str]) -> None:
    """Without cert_file the handshake is refused: a retried tls error saying so."""
    server = await serve(_mtls_server_context(pki))
    stack = await make_stack(**_one(f"https://127.0.0.1:{server.port}/hook", server.port,
                                    tls={"ca_file": pki["ca"], "server_name": "localhost"}))
    ids = await stack.post(event(1))
    found = await async_eventually(lambda: stack.delivery(ids["evt-1/dest"]),
                                   lambda d: d["attempt_count"] >= 1)
    assert found["status"] == "pending"
    error = found["attempts"][0]["error"]
    assert error.startswith(("tls:", "reset:", "disconnected:")), error
    assert not server.requests


def test_check_config_validates_tls_files(tmp_path: Path, pki: dict[str, str]) -> None:
    """Missing files, a key of another certificate and a lone cert_file are errors at tls.*."""
    def problems(tls: dict[str, Any]) -> list[tuple[str, str]]:
        path = write_config(tmp_path, destinations=[
            {"name": "d", "format": "braze", "url": "https://x.example/", "tls": tls}])
        with pytest.raises(ConfigError) as caught:
            compile_destinations(load_config(path, env={}))
        return caught.value.problems

    (missing,) = problems({"cert_file": str(tmp_path / "nope.crt"), "key_file": pki["client_key"]})
    assert missing[0] == "destinations[0].tls.cert_file" and "no such file" in missing[1]
    (mismatch,) = problems({"cert_file": pki["client_cert"], "key_file": pki["server_key"]})
    assert mismatch[0] == "destinations[0].tls.cert_file" and "does not match" in mismatch[1]
    (alone,) = problems({"cert_file": pki["client_cert"]})
    assert alone[0] == "destinations[0].tls.key_file"


def test_tls_files_are_watched_for_reload(tmp_path: Path, pki: dict[str, str]) -> None:
    """A changed client certificate (or key, or CA) triggers a reload like a secret file."""
    from relay.reload import secret_files
    path = write_config(tmp_path, destinations=[
        {"name": "d", "format": "braze", "url": "https://x.example/", "tls": {
            "cert_file": pki["client_cert"], "key_file": pki["client_key"], "ca_file": pki["ca"]}}])
    assert {pki["client_cert"], pki["client_key"], pki["ca"]} <= set(secret_files(str(path)))
    config = load_config(path, env={})
    assert config.destinations[0].tls is not None
    assert config.destinations[0].tls.key_file == pki["client_key"]  # a path, not read as text


# -- egress proxy --------------------------------------------------------------------------


class ConnectProxy:
    """A CONNECT-only HTTP proxy on 127.0.0.1 that records its tunnels and may require
    Proxy-Authorization."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.tunnels: list[str] = []
        self.refused = 0
        self.auth = None if credentials is None else \
            "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
        elif self.auth is not None and headers.get("proxy-authorization") != self.auth:
            self.refused += 1
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Proxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n")
        else:
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            self.tunnels.append(target)
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return
        await writer.drain()
        writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    proxy = ConnectProxy(("relay", "s3cret"))
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_https_goes_through_the_proxy_with_credentials(
        make_stack: Any, serve: Any, pki: dict[str, str], proxy: ConnectProxy) -> None:
    """delivery.proxy tunnels HTTPS with CONNECT, with Proxy-Authorization; render masks it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    server = await serve(context)
    sections = _one(f"https://localhost:{server.port}/hook", server.port,
                    tls={"ca_file": pki["ca"]},
                    delivery={"proxy": f"http://relay:s3cret@127.0.0.1:{proxy.port}"})
    stack = await make_stack(**sections)
    ids = await stack.post(event(1))
    await stack.settle(ids["evt-1/dest"], "delivered")
    assert proxy.tunnels == [f"localhost:{server.port}"]
    assert len(server.requests) == 1
    answer = await (await stack.client.post("/v1/destinations/dest/test")).json()
    assert answer["sent"] is True
    assert answer["request"]["proxy"] == f"http://relay:****@127.0.0.1:{proxy.port}"
    assert "s3cret" not in json.dumps(answer)


async def test_wrong_proxy_credentials_are_a_retried_proxy_error(
        make_stack: Any, serve: Any, pki: dict[str, str], proxy: ConnectProxy) -> None:
    """A 407 from the proxy is a retryable "proxy" failure naming the proxy's answer."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    server = await serve(context)
    stack = await make_stack(**_one(f"https://localhost:{server.port}/hook", server.port,
                                    tls={"ca_file": pki["ca"]},
                                    proxy=f"http://relay:wrong@127.0.0.1:{proxy.port}"))
    ids = await stack.post(event(1))
    found = await async_eventually(lambda: stack.delivery(ids["evt-1/dest"]),
                                   lambda d: d["attempt_count"] >= 1)
    assert found["status"] == "pending"
    assert found["attempts"][0]["error"].startswith("proxy:") and "407" in \
        found["attempts"][0]["error"]
    assert proxy.refused >= 1 and not server.requests


def test_check_config_validates_proxy_and_token_urls(tmp_path: Path) -> None:
    """A proxy that is not http://host:port, and a token_url that is no URL, are errors."""
    path = write_config(tmp_path, delivery={"proxy": "socks5://p:1080"}, destinations=[
        {"name": "d", "format": "braze", "url": "https://x.example/",
         "proxy": "http://p:3128/path",
         "auth": {"type": "oauth2", "token_url": "not a url", "client_id": "c",
                  "client_secret": "s"}}])
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    paths = {p for p, _ in caught.value.problems}
    assert paths == {"delivery.proxy", "destinations[0].proxy", "destinations[0].auth.token_url"}


# -- OAuth2 --------------------------------------------------------------------------------


class TokenEndpoint:
    """Gives tokens tok-1, tok-2, ... valid for ``lifetime`` seconds; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.lifetime = 3600
        self.status = 200

    def __call__(self, request: web.Request) -> web.Response:
        if self.status != 200:
            return web.Response(status=self.status, text="down for maintenance")
        return web.json_response({"access_token": f"tok-{len(self.calls)}",
                                  "token_type": "Bearer", "expires_in": self.lifetime})


async def _oauth_setup(make_stack: Any, serve: Any, **options: Any) -> tuple[Any, Any, Any, Any]:
    tokens = TokenEndpoint()
    token_server = await serve()

    def token_answer(request: web.Request) -> web.Response:
        tokens.calls.append(token_server.requests[-1])
        return tokens(request)

    token_server.answer = token_answer
    dest = await serve()
    sections = _one(f"http://127.0.0.1:{dest.port}/hook", dest.port, auth={
        "type": "oauth2", "token_url": f"http://127.0.0.1:{token_server.port}/token",
        "client_id": "relay", "client_secret": "cs-secret", "scope": "feedback:write",
        "audience": "https://api.example"}, **options)
    sections["delivery"]["allowed_ports"].append(token_server.port)
    sections["server"] = {"max_batch": 500}
    stack = await make_stack(**sections)
    return stack, tokens, dest, token_server


async def test_oauth2_fetches_one_token_for_concurrent_deliveries(make_stack: Any,
                                                                  serve: Any) -> None:
    """20 concurrent deliveries make one token request (client credentials, scope, audience)
    and all carry that token."""
    stack, tokens, dest, _ = await _oauth_setup(make_stack, serve)
    ids = await stack.post(*(event(i) for i in range(20)))
    for delivery_id in ids.values():
        await stack.settle(delivery_id, "delivered")
    assert len(tokens.calls) == 1
    form = dict(pair.split("=", 1) for pair in tokens.calls[0]["body"].decode().split("&"))
    assert form["grant_type"] == "client_credentials" and form["scope"] == "feedback%3Awrite"
    basic = base64.b64decode(tokens.calls[0]["headers"]["Authorization"].split()[1]).decode()
    assert basic == "relay:cs-secret"
    assert {r["headers"]["Authorization"] for r in dest.requests} == {"Bearer tok-1"}


async def test_oauth2_refreshes_once_on_401_and_resends(make_stack: Any, serve: Any) -> None:
    """A 401 with the cached token fetches a new one and sends the request once more."""
    stack, tokens, dest, _ = await _oauth_setup(make_stack, serve)
    refused = iter([True])
    dest.answer = lambda r: web.Response(status=401) if next(refused, False) else \
        web.Response(text="ok")
    ids = await stack.post(event(1))
    found = await stack.settle(ids["evt-1/dest"], "delivered")
    assert found["attempt_count"] == 1
    assert len(tokens.calls) == 2
    assert [r["headers"]["Authorization"] for r in dest.requests] == ["Bearer tok-1",
                                                                      "Bearer tok-2"]


async def test_oauth2_expired_token_is_fetched_again(make_stack: Any, serve: Any) -> None:
    """A token past its expiry (less the margin) is not reused."""
    stack, tokens, dest, _ = await _oauth_setup(make_stack, serve)
    tokens.lifetime = 1  # the margin is half the lifetime: reusable for 0.5 s
    ids = await stack.post(event(1))
    await stack.settle(ids["evt-1/dest"], "delivered")
    await asyncio.sleep(0.6)  # past the token's reuse time (not an assertion on speed)
    ids = await stack.post(event(2))
    await stack.settle(ids["evt-2/dest"], "delivered")
    assert len(tokens.calls) == 2
    assert [r["headers"]["Authorization"] for r in dest.requests] == ["Bearer tok-1",
                                                                      "Bearer tok-2"]


async def test_oauth2_token_endpoint_failure_is_a_retried_failure(make_stack: Any,
                                                                  serve: Any) -> None:
    """A failing token endpoint: the attempt is retried, saying what the endpoint answered,
    the destination is not called, and its host stays healthy; render masks the secret."""
    stack, tokens, dest, _ = await _oauth_setup(make_stack, serve)
    tokens.status = 503
    ids = await stack.post(event(1))
    found = await async_eventually(lambda: stack.delivery(ids["evt-1/dest"]),
                                   lambda d: d["attempt_count"] >= 1)
    error = found["attempts"][0]["error"]
    assert found["status"] == "pending"
    assert error.startswith("token: token endpoint") and "503" in error
    assert not dest.requests
    tokens.status = 200
    await stack.settle(ids["evt-1/dest"], "delivered")
    answer = await (await stack.client.post("/v1/destinations/dest/test")).json()
    assert answer["request"]["auth"]["client_secret"] == "****"
    assert "cs-secret" not in json.dumps(answer) and "tok-" not in json.dumps(answer)


async def test_an_echoed_oauth2_access_token_is_hidden(make_stack: Any, serve: Any) -> None:
    """The access token fetched while sending, echoed by the receiver in its body and a
    header, is hidden in the test-send answer (it was shown in clear: only the configured
    secrets and the request's own headers were known there) and in the activity log."""
    stack, _, dest, _ = await _oauth_setup(make_stack, serve)
    dest.answer = lambda r: web.json_response(
        {"authorization": r.headers["Authorization"]},
        headers={"X-Echo": r.headers["Authorization"]})
    answer = await (await stack.client.post("/v1/destinations/dest/test")).json()
    assert dest.requests[-1]["headers"]["Authorization"] == "Bearer tok-1"
    response = answer["response"]
    assert response["status"] == 200 and "tok-1" not in json.dumps(answer), answer
    assert response["headers"]["X-Echo"] == "Bearer ****"
    assert json.loads(response["body"]) == {"authorization": "Bearer ****"}
    ids = await stack.post(event(1))
    found = await stack.settle(ids["evt-1/dest"], "delivered")
    assert dest.requests[-1]["headers"]["Authorization"].startswith("Bearer tok-")
    assert json.loads(found["attempts"][0]["response_excerpt"]) == {
        "authorization": "Bearer ****"}


async def test_a_token_endpoint_echoing_the_client_credentials_shows_them_nowhere(
        make_stack: Any, serve: Any) -> None:
    """A token endpoint that refuses the request and echoes it: the client's Basic
    credentials (and the secret itself) are hidden in the attempt's error, which the activity
    log keeps and the log prints (the endpoint's answer was quoted as it came)."""
    stack, _, dest, token_server = await _oauth_setup(make_stack, serve)
    token_server.answer = lambda r: web.json_response(
        {"error": "invalid_client", "got": r.headers["Authorization"],
         "secret": "cs-secret"}, status=401)
    ids = await stack.post(event(1))
    found = await async_eventually(lambda: stack.delivery(ids["evt-1/dest"]),
                                   lambda d: d["attempt_count"] >= 1)
    error = found["attempts"][0]["error"]
    assert "answered 401" in error and "Basic ****" in error, error
    assert "cs-secret" not in error and base64.b64encode(b"relay:cs-secret").decode() not in error
    assert not dest.requests   # (nothing was sent without a token)


# -- OpenTelemetry -------------------------------------------------------------------------


@pytest.fixture
def spans() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing.use(None)
    provider.shutdown()


async def test_each_attempt_is_a_span_in_the_senders_trace(make_stack: Any, receiver: Receiver,
                                                           spans: Any) -> None:
    """The ingest traceparent is kept; each attempt is a span of that trace with destination,
    host, attempt number, status and outcome; the destination gets the span's traceparent."""
    from tests.receiver import Answer
    receiver.answer(Answer(503))
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    resp = await stack.client.post("/v1/events", json=event(1),
                                   headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert resp.status == 202
    delivery_id = (await resp.json())["events"][0]["deliveries"][0]["delivery_id"]
    await stack.settle(delivery_id, "delivered")
    finished = await async_eventually(spans.get_finished_spans, lambda s: len(s) >= 2)
    first, second = sorted(finished, key=lambda s: s.attributes["relay.attempt"])
    for span in (first, second):
        assert format(span.context.trace_id, "032x") == trace_id
        assert format(span.parent.span_id, "016x") == parent_id
        assert span.attributes["relay.destination"] == "braze"
        assert span.attributes["server.address"] == f"http://127.0.0.1:{receiver.port}"
    assert (first.attributes["http.response.status_code"], first.attributes["relay.outcome"]) \
        == (503, "retry")
    assert (second.attributes["relay.attempt"], second.attributes["relay.outcome"]) == \
        (2, "delivered")
    sent = receiver.received("/braze")[-1].headers["traceparent"]
    assert sent == f"00-{trace_id}-{format(second.context.span_id, '016x')}-01"


async def test_without_tracing_nothing_is_kept_or_sent(make_stack: Any,
                                                      receiver: Receiver) -> None:
    """Tracing off: the traceparent is not stored and the destination gets none."""
    tracing.use(None)
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    resp = await stack.client.post("/v1/events", json=event(1), headers={
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    delivery_id = (await resp.json())["events"][0]["deliveries"][0]["delivery_id"]
    await stack.settle(delivery_id, "delivered")
    assert "traceparent" not in receiver.received("/braze")[0].headers


async def test_an_otel_setting_the_sdk_refuses_turns_tracing_off_with_one_error(
        make_stack: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bad OTEL_* value (the SDK raises setting up its span processor) costs no ingest and
    no delivery: tracing is off, said once as an error. (It was a 500 on every ingest carrying
    a traceparent.)"""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "-5")
    monkeypatch.setattr(tracing, "_tracer", tracing._UNSET)
    try:
        stack = await make_stack(**receiver_config(receiver, destinations=[
            {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
        with caplog.at_level(logging.ERROR, logger="relay.tracing"):
            plain = await stack.client.post("/v1/events", json=event(1))
            traced = await stack.client.post("/v1/events", json=event(2), headers={
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
            assert (plain.status, traced.status) == (202, 202)
            for resp in (plain, traced):
                delivery_id = (await resp.json())["events"][0]["deliveries"][0]["delivery_id"]
                await stack.settle(delivery_id, "delivered")
        errors = [r.getMessage() for r in caplog.records if r.name == "relay.tracing"]
        assert len(errors) == 1 and "tracing is off" in errors[0] and "OTEL_" in errors[0], errors
        assert "traceparent" not in receiver.received("/braze")[-1].headers
    finally:
        tracing.use(None)
