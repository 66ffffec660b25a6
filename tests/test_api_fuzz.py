"""The whole local API, fuzzed against a real relay process: every path, query parameter,
header and body of /v1/* gets an answer below 500, every 400 says what was wrong, and the spool
writer never restarts."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import RelayProcess, write_config

TOKEN = "fuzz-token-0123456789"
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    tmp = tmp_path_factory.mktemp("api-fuzz")
    proc = RelayProcess(write_config(tmp, server={"token": TOKEN, "max_body_bytes": 65536}),
                        tmp / "relay.log").start()
    try:
        yield proc
    finally:
        proc.stop()


def raw_request(url: str, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                body: bytes) -> tuple[int, bytes]:
    """Send exactly these bytes (header values need not be ASCII) and read the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: " + host.encode(),
             b"Connection: close", b"Content-Length: " + str(len(body)).encode()]
    lines += [name + b": " + value for name, value in headers]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


text = st.text(max_size=30)
numbers = st.one_of(st.integers(-(2**80), 2**80), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["", "-1", "0", "1e999", "NaN", "0x10", " 5", "١٢"]))
query_value = st.one_of(text, numbers.map(str))
paths = st.one_of(
    st.just("/v1/events"), st.just("/v1/deliveries"), st.just("/v1/deliveries/retry"),
    st.just("/v1/hosts"),
    text.map(lambda t: f"/v1/deliveries/{quote(t, safe='')}"),
    text.map(lambda t: f"/v1/deliveries/{quote(t, safe='')}/retry"),
    st.sampled_from(["ajo", "braze", "crm", "nope", "%00", "..%2F.."]).map(
        lambda n: f"/v1/destinations/{n}/test"),
    text.map(lambda t: "/v1/" + quote(t, safe="/")))
queries = st.dictionaries(st.sampled_from(["status", "destination", "limit", "next", "after",
                                           "x"]), query_value, max_size=4)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), text),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(
                                ["delivery_ids", "destination", "failed_since", "id", "channel",
                                 "status", "message_id", "attributes"]) | text, inner,
                                max_size=4)), max_leaves=12)
bodies = st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200),
                   st.sampled_from([b"", b"{", b"[" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
                                    b'{"failed_since": 1e999}', b'{"failed_since": NaN}']))
# Header values as HTTP allows them (no control characters: a malformed header line is the
# HTTP parser's to refuse, see tests/test_junk.py), any other byte included.
header_bytes = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F).strip())
auth_values = st.one_of(st.just(b"Bearer " + TOKEN.encode()), header_bytes,
                        st.just("Bearer é".encode()), st.just(b"Bearer \xff\xfe"))
content_types = st.sampled_from([b"application/json", b"text/plain", b"application/x+json",
                                 b"", b"\xff"])


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), path=paths,
       query=queries, body=bodies, auth=auth_values, ctype=content_types)
def test_any_request_to_the_api_is_answered_without_5xx(relay: RelayProcess, method: str,
                                                        path: str, query: dict[str, str],
                                                        body: bytes, auth: bytes,
                                                        ctype: bytes) -> None:
    """No request made of these parts gets a 5xx; a 400 names what was wrong; the writer
    keeps its pid."""
    writer = relay.writer_pid()
    target = (path + ("?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
                      if query else "")).encode()
    headers = [(b"Authorization", auth.replace(b"\r", b"").replace(b"\n", b"")),
               (b"Content-Type", ctype)]
    status, payload = raw_request(relay.url, method, target, headers, body)
    assert status < 500, (status, payload[:300])
    if status == 400:
        answer: Any = json.loads(payload)
        assert isinstance(answer.get("error"), str) and answer["error"], answer
    assert relay.writer_pid() == writer


def test_the_relay_survived_the_fuzzing(relay: RelayProcess, tmp_path: Path) -> None:
    """After the fuzzing the relay is ready and its log holds no traceback."""
    status, _ = raw_request(relay.url, "GET", b"/readyz", [], b"")
    assert status == 200
    assert "Traceback" not in relay.log()
