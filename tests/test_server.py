"""The HTTP API: ingest answers of SPEC.md, limits, auth, health; never a 500 for client input."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import Config, load_config
from relay.server import STATE
from tests.helpers import ServerThread, event, http, write_config


def make_config(tmp_path: Path, **sections: Any) -> Config:
    return load_config(write_config(tmp_path, **sections), env={})


@pytest.fixture
def client_for(make_stack: Any) -> Any:
    async def make(**sections: Any) -> Any:
        return (await make_stack(dispatch=False, **sections)).client

    return make


async def test_single_event_gets_202_with_deliveries(client_for: Any) -> None:
    """One event: 202 and one delivery per matching destination, skipped ones flagged."""
    client = await client_for()
    resp = await client.post("/v1/events", json=event(1, status="processed"))
    assert resp.status == 202
    (entry,) = (await resp.json())["events"]
    assert entry["id"] == "evt-1" and "duplicate" not in entry
    by_dest = {d["destination"]: d for d in entry["deliveries"]}
    assert set(by_dest) == {"ajo", "braze", "crm"}
    assert by_dest["ajo"].get("skipped") is True  # ajo cannot express "processed"
    assert "skipped" not in by_dest["braze"]


async def test_batch_and_duplicates(client_for: Any) -> None:
    """A batch is stored whole; a repeat is flagged; an all-repeat request answers 200."""
    client = await client_for()
    first = await client.post("/v1/events", json=[event(1), event(2)])
    assert first.status == 202
    mixed = await client.post("/v1/events", json=[event(2), event(3)])
    assert mixed.status == 202
    body = await mixed.json()
    assert body["events"][0]["duplicate"] is True and "duplicate" not in body
    assert body["events"][0]["deliveries"] == (await first.json())["events"][1]["deliveries"]
    repeat = await client.post("/v1/events", json=event(1))
    assert repeat.status == 200 and (await repeat.json())["duplicate"] is True


async def test_invalid_batch_stores_nothing(client_for: Any) -> None:
    """A batch with one bad event is refused whole, with the path of the bad field."""
    client = await client_for()
    resp = await client.post("/v1/events", json=[event(1), event(2), event(3), {"channel": "x"}])
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "invalid event"
    assert {"path": "[3].channel", "message": "must be one of 'email' or 'sms' (got 'x')"} \
        in body["details"]
    listing = await (await client.get("/v1/deliveries")).json()
    assert listing["deliveries"] == []


async def test_content_type_and_size_limits(client_for: Any) -> None:
    """Non-JSON is 415; a body over max_body_bytes is 413 (declared or streamed)."""
    client = await client_for(server={"max_body_bytes": 2048})
    resp = await client.post("/v1/events", data=b"x=1",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 415 and "application/json" in (await resp.json())["error"]
    big = json.dumps([event(i) for i in range(40)]).encode()
    resp = await client.post("/v1/events", data=big, headers={"Content-Type": "application/json"})
    assert resp.status == 413

    async def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(10):
            yield b" " * 1024

    resp = await client.post("/v1/events", data=chunks(),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413


async def test_batch_limit(client_for: Any) -> None:
    """More than server.max_batch events is a 400 naming the limit."""
    client = await client_for(server={"max_batch": 2})
    resp = await client.post("/v1/events", json=[event(i) for i in range(3)])
    assert resp.status == 400 and "server.max_batch" in (await resp.json())["details"][0]["message"]


async def test_token_guards_v1(client_for: Any) -> None:
    """With server.token set, /v1/* needs the Bearer token; health endpoints stay open."""
    client = await client_for(server={"token": "t0k"})
    assert (await client.post("/v1/events", json=event(1))).status == 401
    wrong = await client.post("/v1/events", json=event(1), headers={"Authorization": "Bearer x"})
    assert wrong.status == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
    ok = await client.post("/v1/events", json=event(1), headers={"Authorization": "Bearer t0k"})
    assert ok.status == 202
    assert (await client.get("/v1/deliveries")).status == 401
    assert (await client.get("/healthz")).status == 200


async def test_401_says_which_of_header_scheme_or_token_was_wrong(client_for: Any) -> None:
    """A 401 says whether the Authorization header was missing, not Bearer, or the wrong
    token, and nothing about the real token (every wrong token gets the same answer)."""
    client = await client_for(server={"token": "t0k-secret-value"})

    async def refused(headers: dict[str, str]) -> str:
        resp = await client.get("/v1/hosts", headers=headers)
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        return str((await resp.json())["error"])

    assert await refused({}) == \
        "no Authorization header: send Authorization: Bearer <server.token>"
    for header in ("Basic dXNlcjpwYXNz", "t0k-secret-value", "Token t0k-secret-value"):
        assert await refused({"Authorization": header}) == "the Authorization header is not a " \
            "Bearer token: send Authorization: Bearer <server.token>", header
    wrong = {await refused({"Authorization": f"Bearer {token}"})
             for token in ("x", "t0k-secret-valu", "t0k-secret-value-", "T0K-SECRET-VALUE", "")}
    assert wrong == {"wrong Bearer token: it is not the relay's server.token"}
    ok = await client.get("/v1/hosts", headers={"Authorization": "bearer t0k-secret-value"})
    assert ok.status == 200


async def test_allow_cidrs(client_for: Any) -> None:
    """A client outside server.allow_cidrs is refused with 403."""
    client = await client_for(server={"allow_cidrs": ["10.0.0.0/8"]})
    assert (await client.post("/v1/events", json=event(1))).status == 403
    open_client = await client_for(server={"allow_cidrs": ["127.0.0.0/8"]})
    assert (await open_client.post("/v1/events", json=event(1))).status == 202


async def test_probes_and_metrics_are_open_whatever_allow_cidrs_and_token_say(
        client_for: Any) -> None:
    """/healthz, /readyz and /metrics answer a client outside server.allow_cidrs and without
    the token, while /v1/* refuses it."""
    client = await client_for(server={"allow_cidrs": ["10.0.0.0/8"], "token": "t0k"})
    assert (await client.post("/v1/events", json=event(1))).status == 403
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(path)).status == 200, path


async def test_spool_full_is_503_with_retry_after(client_for: Any, caplog: Any) -> None:
    """When spool.max_events events await delivery, ingest answers 503 with Retry-After, and
    the log says so (once per 10 s: the metric counts every refusal)."""
    client = await client_for(spool={"max_events": 2})
    assert (await client.post("/v1/events", json=[event(1), event(2)])).status == 202
    for _ in range(3):
        resp = await client.post("/v1/events", json=event(3))
        assert resp.status == 503 and int(resp.headers["Retry-After"]) > 0
        assert "max_events" in (await resp.json())["error"]
    warnings = [r for r in caplog.records if "ingest refused" in r.getMessage()]
    assert len(warnings) == 1 and "max_events" in warnings[0].getMessage()


async def test_health_and_readiness(client_for: Any) -> None:
    """healthz is liveness; readyz turns 503 when draining."""
    client = await client_for()
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    client.server.app[STATE]["draining"] = True
    assert (await client.get("/readyz")).status == 503


async def test_unknown_paths_and_methods_answer_json(client_for: Any) -> None:
    """404 and 405 come back as JSON errors; a 404 names the API's paths (it said only
    "Not Found")."""
    client = await client_for()
    for path in ("/nope", "/v1/delivery", "/v1/events/x", "/v1/deliveries/a/b"):
        resp = await client.get(path)
        assert resp.status == 404 and (await resp.json()) == {"error": (
            "no such path; the API's paths are POST /v1/events, GET /v1/deliveries, "
            "POST /v1/deliveries/retry, GET /v1/deliveries/{delivery_id}, "
            "POST /v1/deliveries/{delivery_id}/retry, POST /v1/destinations/{name}/test, "
            "GET /v1/hosts, GET /healthz, GET /readyz, GET /metrics (docs/api.md)")}, path
    resp = await client.get("/v1/events")
    assert resp.status == 405 and "POST" in resp.headers["Allow"]


async def test_activity_log_queries(client_for: Any) -> None:
    """The activity log filters by status and destination, pages, and rejects bad parameters."""
    client = await client_for()
    await client.post("/v1/events", json=[event(i) for i in range(3)])
    page = await (await client.get("/v1/deliveries?destination=ajo&limit=2")).json()
    assert [d["event_id"] for d in page["deliveries"]] == ["evt-0", "evt-1"]
    rest = await (await client.get(f"/v1/deliveries?destination=ajo&next={page['next']}")).json()
    assert [d["event_id"] for d in rest["deliveries"]] == ["evt-2"] and rest["next"] is None
    one = page["deliveries"][0]
    got = await (await client.get(f"/v1/deliveries/{one['delivery_id']}")).json()
    assert got["status"] == "pending" and got["destination"] == "ajo"
    assert (await client.get("/v1/deliveries?status=lost")).status == 400
    assert (await client.get("/v1/deliveries?limit=abc")).status == 400
    assert (await client.get("/v1/deliveries/dlv_missing")).status == 404


async def test_unknown_query_parameters_are_refused(client_for: Any) -> None:
    """A query parameter a GET of the API does not take is a 400 naming it and what the
    endpoint takes (`?state=pending` listed every delivery)."""
    client = await client_for()
    await client.post("/v1/events", json=event(1))
    resp = await client.get("/v1/deliveries?state=pending")
    assert resp.status == 400
    assert (await resp.json()) == {"error": "unknown query parameter 'state': GET "
                                            "/v1/deliveries takes status, destination, limit, next"}
    resp = await client.get("/v1/deliveries?status=pending&x=1&y=2&limit=5")
    assert resp.status == 400 and "parameters 'x', 'y':" in (await resp.json())["error"]
    for path in ("/v1/hosts?state=suspended", "/v1/deliveries/dlv_x?verbose=1"):
        resp = await client.get(path)
        assert resp.status == 400, path
        assert "takes no query parameters" in (await resp.json())["error"], path
    for path in ("/v1/deliveries?status=pending&destination=ajo&limit=5&next=0",
                 "/v1/deliveries?after=0", "/v1/hosts", "/healthz?probe=1", "/readyz?x=1",
                 "/metrics?name[]=relay_events_accepted_total"):
        assert (await client.get(path)).status == 200, path


async def test_replay_of_an_unknown_destination_is_refused(client_for: Any) -> None:
    """A replay by a destination the config does not have is a 400 listing the configured
    ones (it answered 202 with nothing replayed)."""
    client = await client_for()
    resp = await client.post("/v1/deliveries/retry", json={"destination": "nope"})
    assert resp.status == 400
    assert (await resp.json()) == {"error": "no destination 'nope' (destinations: ajo, braze, "
                                            "crm)"}
    resp = await client.post("/v1/deliveries/retry", json={"destination": "crm",
                                                           "failed_since": 0})
    assert resp.status == 202 and (await resp.json()) == {"replayed": []}


async def test_a_query_parameter_of_a_replay_or_test_send_is_refused(client_for: Any) -> None:
    """The POSTs that act take their filters from the body, not the query: `?destination=crm`
    beside `{"failed_since": 0}` replayed every destination's failed deliveries."""
    client = await client_for()
    for path in ("/v1/deliveries/retry?destination=crm", "/v1/deliveries/dlv_x/retry?force=1",
                 "/v1/destinations/crm/test?dry_run=1"):
        resp = await client.post(path, json={"failed_since": 0})
        assert resp.status == 400, path
        assert "takes no query parameters" in (await resp.json())["error"], path


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=30)
field_names = st.sampled_from(["id", "channel", "status", "message_id", "occurred_at", "recipient",
                               "failure", "retry_count", "timestamps", "attributes", "language"])
near_events = st.fixed_dictionaries(
    {"channel": st.sampled_from(["email", "sms", "fax", 1]),
     "status": st.sampled_from(["sent", "bounced", "delayed", "nope"]),
     "message_id": st.one_of(st.text(max_size=10), st.integers())},
    optional={"id": st.text(max_size=8), "occurred_at": st.text(max_size=30),
              "recipient": json_values, "failure": json_values, "retry_count": json_values,
              "timestamps": json_values, "attributes": json_values})
bodies = st.one_of(json_values, near_events, st.lists(near_events, max_size=4),
                   st.dictionaries(field_names, json_values))


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory):
    config = make_config(tmp_path_factory.mktemp("fuzz"))
    with ServerThread(config) as server:
        yield server


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_arbitrary_json_never_gets_a_5xx(live_server: ServerThread, body: Any) -> None:
    """Any JSON at all gets 202, 200 or a 400 whose details name paths; never a 5xx."""
    status, _, answer = http("POST", live_server.url + "/v1/events", json.dumps(body).encode())
    assert status in (200, 202, 400), (status, answer)
    if status == 400:
        assert answer["error"] and all("path" in d and d["message"] for d in answer["details"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_get_a_5xx(live_server: ServerThread, raw: bytes) -> None:
    """Random bytes labelled as JSON get a 4xx, and the server keeps serving."""
    status, _, _ = http("POST", live_server.url + "/v1/events", raw)
    assert 400 <= status < 500
    assert http("GET", live_server.url + "/healthz")[0] == 200


async def test_answer_carries_any_sender_id_exactly(client_for: Any) -> None:
    """Sender ids are written into the answer as they are only when JSON needs no escape."""
    client = await client_for()
    odd = ['plain-id_1.2:3@x', 'quote"back\\slash', "caf\u00e9 \u2603", "tab\there", "</script>"]
    resp = await client.post("/v1/events", json=[event(0, id=i) for i in odd])
    assert resp.status == 202
    assert [entry["id"] for entry in (await resp.json())["events"]] == odd


async def test_api_answers_503_not_500_while_the_spool_cannot_answer(make_stack: Any,
                                                                     monkeypatch: Any) -> None:
    """With the spool unreachable (a PostgreSQL outage), the activity log, replays and hosts
    were 500s with a traceback each, and /metrics lost every series; they are 503s with
    Retry-After, and /metrics still answers with the other series."""
    from relay.errors import SpoolError

    stack = await make_stack(dispatch=False)
    ids = await stack.post(event(1))
    delivery_id = next(iter(ids.values()))

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise SpoolError("the spool database is unreachable: connection refused")

    for name in ("list_deliveries", "get_delivery", "attempts_of", "replay", "counts",
                 "oldest_due", "stats", "pending_by_destination"):
        monkeypatch.setattr(stack.spool, name, down)
    for method, path, body in (("GET", "/v1/deliveries", None),
                               ("GET", f"/v1/deliveries/{delivery_id}", None),
                               ("POST", f"/v1/deliveries/{delivery_id}/retry", None),
                               ("POST", "/v1/deliveries/retry", {"failed_since": 0})):
        resp = await stack.client.request(method, path, json=body)
        assert resp.status == 503, (path, resp.status, await resp.text())
        assert resp.headers["Retry-After"] == "5"
        assert "try again" in (await resp.json())["error"]   # (the cause stays in the log)
    scrape = await stack.client.get("/metrics")
    assert scrape.status == 200 and "relay_events_accepted_total" in await scrape.text()


async def test_metrics_answer_while_the_spools_reads_hang(make_stack: Any,
                                                           monkeypatch: Any) -> None:
    """A blackholed database (no answer, no refusal) held every scrape until the client's
    command timeout: /metrics went dark exactly during the outage. A scrape now answers
    within SPOOL_GAUGES_WAIT with the spool's gauges as last read, and scrapes meanwhile
    share the one read under way instead of starting one each."""
    from relay import server

    monkeypatch.setattr(server, "SPOOL_GAUGES_WAIT", 0.3)
    stack = await make_stack(dispatch=False)
    await stack.post(event(1))
    first = await stack.client.get("/metrics")
    assert 'relay_spool_deliveries{state="pending"} 3.0' in await first.text()
    reads: list[str] = []

    async def hang(*args: Any, **kwargs: Any) -> Any:
        reads.append("counts")
        await asyncio.sleep(3600)

    monkeypatch.setattr(stack.spool, "counts", hang)
    await asyncio.sleep(1.1)   # past the shared reading's second
    for _ in range(3):
        started = time.monotonic()
        scrape = await asyncio.wait_for(stack.client.get("/metrics"), 5)
        assert scrape.status == 200
        text = await scrape.text()
        assert time.monotonic() - started < 1.5
        assert "relay_events_accepted_total 1.0" in text
        assert 'relay_spool_deliveries{state="pending"} 3.0' in text   # as last read
        await asyncio.sleep(1.1)
    assert reads == ["counts"], reads


async def test_nul_in_api_values_is_a_client_error(make_stack: Any) -> None:
    """A NUL in a query value or a delivery id reached the spool (PostgreSQL's text cannot
    hold one: a 500); an event id with one was a 503 retried for good. They are 4xx now."""
    stack = await make_stack(dispatch=False)
    assert (await stack.client.get("/v1/deliveries?destination=a%00")).status == 400
    assert (await stack.client.get("/v1/deliveries/dlv_%00")).status == 404
    assert (await stack.client.post("/v1/deliveries/dlv_%00/retry")).status == 404
    resp = await stack.client.post("/v1/events", json=event(1, id="evt\x00one"))
    assert resp.status == 400 and "id" in await resp.text()
