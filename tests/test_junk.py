"""Junk on the listener, against a real relay process over raw sockets: quiet logs (no
traceback, a few info lines at most), the relay's JSON error shape, 431 for a header too
large, and `Expect: 100-continue` answered with the final status when the headers decide it."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from relay.logs import Throttle
from tests.helpers import Clock, RelayProcess, write_config

TOKEN = "relay-token-0123456789"
UNKNOWN_SECRET = "sk_live_not_configured_4242"  # a client's secret the relay cannot know

JUNK = [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",                                 # HTTP/2 preface
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32),         # TLS ClientHello
    bytes(range(256)),                                                  # binary garbage
    b"GET\r\n\r\n",                                                     # no target, no version
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",                               # unknown version
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Auth " + UNKNOWN_SECRET.encode() + b"\r\n\r\n",  # no colon
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",                              # space before colon
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 3\r\n\r\n0\r\n\r\n",                              # smuggling shape
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",                # NUL in a value
    b"G\x00ET / HTTP/1.1\r\nHost: x\r\n\r\n",                           # NUL in the method
    b"G\xc3\x89T / HTTP/1.1\r\nHost: x\r\n\r\n",                        # non-ASCII method
    b"GET / HTTP/1.1\r\nHost: x\r\n folded: " + TOKEN.encode() + b"\r\n\r\n",  # obs-fold
    b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n",                           # DEL in the target
]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    tmp_path = tmp_path_factory.mktemp("junk")
    proc = RelayProcess(write_config(tmp_path, server={"token": TOKEN, "max_body_bytes": 4096}),
                        tmp_path / "relay.log")
    proc.start()
    yield proc
    proc.stop()


def address(relay: RelayProcess) -> tuple[str, int]:
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def exchange(relay: RelayProcess, data: bytes, *, until_head: bool = False) -> bytes:
    """Send raw bytes and read the answer until the server closes (or, with ``until_head``,
    until the first response's head and its Content-Length body have arrived)."""
    with socket.create_connection(address(relay), timeout=10) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return b""
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return answer
            if not chunk:
                return answer
            answer += chunk
            if until_head and b"\r\n\r\n" in answer:
                head, _, body = answer.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if len(body) >= length:
                    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> object:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def test_junk_requests_are_quiet_and_safe(relay: RelayProcess) -> None:
    """17 malformed requests leave no traceback and no error in the log, at most a few info
    lines, and no secret; every answer is a 4xx (never 500), in the JSON error shape."""
    before = len(relay.log().splitlines())
    for probe in JUNK:
        answer = exchange(relay, probe)
        if answer:
            assert 400 <= status_of(answer) < 500, (probe, answer)
            if status_of(answer) == 400:
                assert "error" in body_of(answer), answer  # type: ignore[operator]
    # One request that is fine, so everything the junk caused has been logged before it.
    healthy = exchange(relay, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(healthy) == 200
    new = relay.log().splitlines()[before:]
    text = "\n".join(new)
    assert "Traceback" not in text
    assert UNKNOWN_SECRET not in text and TOKEN not in text
    entries = [json.loads(line) for line in new if line.startswith("{")]
    assert not [e for e in entries if e["level"] in ("error", "critical", "warning")], text
    assert len(new) <= 3, text


def test_a_10kb_header_gets_431(relay: RelayProcess) -> None:
    """A header over aiohttp's field limit is answered 431 with a JSON error."""
    answer = exchange(relay, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                      + b"a" * 10_000 + b"\r\n\r\n")
    assert status_of(answer) == 431
    assert "header" in body_of(answer)["error"]  # type: ignore[index]


def expect(relay: RelayProcess, *headers: bytes) -> bytes:
    head = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
    return exchange(relay, head + b"".join(h + b"\r\n" for h in headers) + b"\r\n",
                    until_head=True)


def test_expect_continue_gets_the_final_status_from_the_headers(relay: RelayProcess) -> None:
    """With `Expect: 100-continue` and no body sent, a Content-Length over
    server.max_body_bytes gets 413, a non-JSON type 415, a missing token 401, at once."""
    auth = b"Authorization: Bearer " + TOKEN.encode()
    too_large = expect(relay, auth, b"Content-Type: application/json",
                       b"Content-Length: 10000000")
    assert status_of(too_large) == 413, too_large
    assert "max_body_bytes" in body_of(too_large)["error"]  # type: ignore[index]
    assert status_of(expect(relay, auth, b"Content-Type: text/plain",
                            b"Content-Length: 10")) == 415
    assert status_of(expect(relay, b"Content-Type: application/json",
                            b"Content-Length: 10")) == 401


def test_expect_continue_still_continues_when_the_headers_are_fine(
        relay: RelayProcess) -> None:
    """A request the headers do not decide gets 100 Continue, then its answer for the body."""
    body = json.dumps({"channel": "email", "status": "delivered", "message_id": "m-1"}).encode()
    with socket.create_connection(address(relay), timeout=10) as sock:
        sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        first = sock.recv(1024)
        assert first.startswith(b"HTTP/1.1 100 Continue"), first
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    final = answer[answer.index(b"HTTP/1.1 2"):] if b"HTTP/1.1 2" in answer else answer
    assert status_of(final) == 202, answer


def test_throttle_lets_one_line_through_per_period_and_counts_the_rest() -> None:
    """The first line passes, the next ones within the period are held and counted, and the
    first line after the period says how many were held."""
    clock = Clock(0.0)
    throttle = Throttle(10.0, clock)
    assert throttle.allow() == 0
    assert [throttle.allow() for _ in range(5)] == [None] * 5
    clock.now += 10
    assert throttle.allow() == 5
    assert throttle.allow() is None


def test_aiohttp_tracebacks_are_masked_like_messages() -> None:
    """A record from aiohttp's logger with a traceback holding a configured secret is
    written with the secret masked, in the traceback too."""
    import io
    import logging

    from relay.logs import JsonFormatter, MaskSecrets

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(MaskSecrets([TOKEN]))
    logger = logging.getLogger("aiohttp.server")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"Invalid HTTP header: 'Authorization Bearer {TOKEN}'")
        except ValueError:
            logger.exception("Error handling request from %s", "127.0.0.1")
    finally:
        logger.removeHandler(handler)
    entry = json.loads(out.getvalue())
    assert "Traceback" in entry["exception"] and "****" in entry["exception"]
    assert TOKEN not in out.getvalue()


def post(relay: RelayProcess, path: bytes, body: bytes, *headers: bytes) -> bytes:
    head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n")
    return exchange(relay, head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body)


def test_a_body_that_cannot_be_decoded_gets_400_and_no_traceback(relay: RelayProcess) -> None:
    """A body whose Content-Encoding does not decode (not gzip at all, gzip with junk after it,
    bad deflate) is the client's error: a JSON 400 that says so, on every path that reads a
    body, and a body no route reads is drained as quietly. It was a plain-text 500 with an
    error-level traceback."""
    import gzip

    before = len(relay.log().splitlines())
    bad = [(b"gzip", b"garbage"), (b"gzip", gzip.compress(b"{}") + b"junk"),
           (b"deflate", b"garbage")]
    for encoding, body in bad:
        for path in (b"/v1/events", b"/v1/deliveries/retry"):
            answer = post(relay, path, body, b"Content-Encoding: " + encoding)
            assert status_of(answer) == 400, (path, encoding, answer)
            assert "Content-Encoding" in body_of(answer)["error"], answer  # type: ignore[index]
    drained = exchange(relay, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                              b"Content-Encoding: gzip\r\nContent-Length: 7\r\n\r\ngarbage")
    assert status_of(drained) in (200, 400), drained
    healthy = exchange(relay, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(healthy) == 200
    text = "\n".join(relay.log().splitlines()[before:])
    assert "Traceback" not in text and '"level": "error"' not in text, text


def test_a_client_that_hangs_up_mid_body_leaves_no_traceback(relay: RelayProcess) -> None:
    """A connection closed half way through its body: nothing stored, and no error-level
    traceback per drop (any client could flood the log with them)."""
    before = len(relay.log().splitlines())
    body = json.dumps({"id": "dropped", "channel": "email", "status": "sent",
                       "message_id": "m"}).encode()
    for _ in range(3):
        with socket.create_connection(address(relay), timeout=10) as sock:
            sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                         + body[:len(body) // 2])
    healthy = exchange(relay, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(healthy) == 200
    listed = exchange(relay, b"GET /v1/deliveries HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                             b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    assert b"dropped" not in listed
    text = "\n".join(relay.log().splitlines()[before:])
    assert "Traceback" not in text and '"level": "error"' not in text, text


def test_replay_bodies_the_spool_cannot_take_are_refused(relay: RelayProcess) -> None:
    """A lone surrogate (valid JSON, not encodable text) in delivery_ids or destination is a
    400, as it is in an event (it reached the spool writer: a 500). A delivery_ids that is
    not a list, or an empty destination, is a 400 too, not a replay by whatever else was
    given."""
    for body in (b'{"delivery_ids": ["\\ud800"]}', b'{"destination": "\\udfff"}',
                 b'{"delivery_ids": false, "destination": "braze"}',
                 b'{"delivery_ids": {}, "destination": "braze"}',
                 b'{"delivery_ids": "", "failed_since": 0}',
                 b'{"destination": "", "failed_since": 0}'):
        answer = post(relay, b"/v1/deliveries/retry", body)
        assert status_of(answer) == 400, (body, answer)
        assert "error" in body_of(answer), answer  # type: ignore[operator]


def test_odd_requests_get_the_json_error_they_are_documented_with(relay: RelayProcess) -> None:
    """A request target over aiohttp's line limit is 414 (it was 431: aiohttp gives the line
    as a bytearray); an Expect other than 100-continue is a JSON 417 on every route; a limit
    is ASCII digits only; a missing Content-Type says "none"."""
    long = exchange(relay, b"GET /v1/deliveries?x=" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(long) == 414, long[:200]
    for path in (b"/healthz", b"/v1/events"):
        answer = exchange(relay, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n"
                          b"Content-Length: 0\r\nConnection: close\r\n\r\n", until_head=True)
        assert status_of(answer) == 417 and "Expect" in body_of(answer)["error"], answer  # type: ignore[index]
    for limit in (b"+5", b"%205", b"5_0", b"%EF%BC%95"):
        answer = exchange(relay, b"GET /v1/deliveries?limit=" + limit + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Authorization: Bearer " + TOKEN.encode() + b"\r\nConnection: close\r\n\r\n")
        assert status_of(answer) == 400, (limit, answer)
    untyped = exchange(relay, b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       + TOKEN.encode() + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert status_of(untyped) == 415 and "none" in body_of(untyped)["error"], untyped  # type: ignore[index]


def test_connections_past_max_connections_get_a_503(tmp_path_factory: pytest.TempPathFactory
                                                     ) -> None:
    """Past server.max_connections a new connection is answered 503 (JSON, Retry-After) and
    closed, under the relay's real event loop (uvloop): its transport is not an
    asyncio.Transport, and an assert on that closed every such connection without a word."""
    tmp_path = tmp_path_factory.mktemp("capped")
    proc = RelayProcess(write_config(tmp_path, server={"max_connections": 2}),
                        tmp_path / "relay.log").start()
    try:
        held = [socket.create_connection(address(proc), timeout=10) for _ in range(2)]
        try:
            answer = exchange(proc, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(answer) == 503, answer
            assert b"Retry-After: 1" in answer and "max_connections" in body_of(answer)["error"]  # type: ignore[index]
        finally:
            for sock in held:
                sock.close()
        assert "Traceback" not in proc.log() and "AssertionError" not in proc.log()
    finally:
        proc.stop()
