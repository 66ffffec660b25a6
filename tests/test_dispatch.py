"""Delivery against a real receiver: outcomes, retries, signatures, dead letter, replay."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from standardwebhooks import Webhook

import relay.dispatch
from relay.config import load_config
from relay.errors import SpoolError
from relay.policy import next_attempt_at
from relay.spool import Due
from tests.helpers import async_eventually, event, write_config
from tests.receiver import Answer, Receiver, closed_port, receiver_config


async def test_delivers_each_format_with_headers_and_signatures(make_stack: Any,
                                                                receiver: Receiver) -> None:
    """Each destination gets its shape, Webhook-Id, User-Agent, and a verifiable signature."""
    stack = await make_stack(**receiver_config(receiver))
    ids = await stack.post(event(1, status="bounced", failure={"reason": "550 no such user"}))
    for delivery_id in ids.values():
        await stack.settle(delivery_id, "delivered")
    (ajo,) = receiver.received("/ajo")
    assert ajo.headers["Webhook-Id"] == ids["evt-1/ajo"]
    assert ajo.headers["User-Agent"].startswith("relay/")
    claims = jwt.decode(ajo.headers["Authorization"].removeprefix("Bearer "), "k" * 40,
                        algorithms=["HS256"], audience="ajo")
    assert claims["exp"] > claims["iat"]
    assert json.loads(ajo.body)["messageDeliveryFeedback"]["feedbackStatus"] == {"value": "bounce"}
    (braze,) = receiver.received("/braze")
    payload = Webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").verify(braze.body.decode(),
                                                                       braze.headers)
    assert payload["metadata"]["reason"] == "550 no such user"
    (crm,) = receiver.received("/crm/")
    assert (crm.method, crm.path) == ("PUT", "/crm/msg-1")
    assert crm.headers["Authorization"] == "Bearer crm-token"
    assert json.loads(crm.body) == {"status": "bounced"}
    record = await stack.delivery(ids["evt-1/ajo"])
    assert record["attempt_count"] == 1 and record["attempts"][0]["status_code"] == 200


async def test_500_twice_then_200_is_three_attempts_with_one_webhook_id(
        make_stack: Any, receiver: Receiver) -> None:
    """Retryable answers are retried through the spool with the same Webhook-Id."""
    receiver.answer(Answer(500, body="boom"), Answer(503))
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    ids = await stack.post(event(1))
    found = await stack.settle(ids["evt-1/braze"], "delivered")
    got = receiver.received("/braze")
    assert len(got) == 3
    assert {r.headers["Webhook-Id"] for r in got} == {ids["evt-1/braze"]}
    assert [a["status_code"] for a in found["attempts"]] == [500, 503, 200]
    assert found["attempts"][0]["response_excerpt"] == "boom"
    assert got[1].at - got[0].at >= 0.035  # backoff_initial 50 ms, jitter 20 %


async def test_400_fails_at_once_and_replay_delivers(make_stack: Any, receiver: Receiver) -> None:
    """A 400 is one attempt and a failed entry with status and excerpt; replay delivers it."""
    receiver.answer(Answer(400, body='{"error": "bad field"}'))
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    ids = await stack.post(event(1))
    failed = await stack.settle(ids["evt-1/braze"], "failed")
    assert len(failed["attempts"]) == 1
    assert failed["attempts"][0]["status_code"] == 400
    assert "bad field" in failed["attempts"][0]["response_excerpt"]
    assert failed["reason"] == "400"
    listing = await (await stack.client.get("/v1/deliveries?status=failed")).json()
    assert [d["delivery_id"] for d in listing["deliveries"]] == [ids["evt-1/braze"]]

    resp = await stack.client.post(f"/v1/deliveries/{ids['evt-1/braze']}/retry")
    assert resp.status == 202
    delivered = await stack.settle(ids["evt-1/braze"], "delivered")
    assert [a["status_code"] for a in delivered["attempts"]] == [400, 200]
    again = await stack.client.post(f"/v1/deliveries/{ids['evt-1/braze']}/retry")
    assert again.status == 409


@pytest.mark.parametrize("status", [301, 302, 404, 410])
async def test_3xx_and_other_4xx_are_not_retried(make_stack: Any, receiver: Receiver,
                                                  status: int) -> None:
    """Redirects are never followed and other 4xx never retried."""
    receiver.set_default(Answer(status, headers={"Location": "/elsewhere"}))
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    ids = await stack.post(event(1))
    failed = await stack.settle(ids["evt-1/braze"], "failed")
    assert len(receiver.received()) == 1 and failed["attempts"][0]["status_code"] == status


async def test_408_and_429_honour_retry_after(make_stack: Any, receiver: Receiver,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """408/429 are retried, waiting as long as Retry-After says (clamped, 1 s minimum)."""
    delays: list[float | None] = []  # the wait the policy chose after each attempt

    def spy(policy: Any, outcome: Any, **facts: Any) -> float | None:
        when = next_attempt_at(policy, outcome, **facts)
        delays.append(None if when is None else when - facts["now"])
        return when

    monkeypatch.setattr("relay.policy.next_attempt_at", spy)  # what policy.decide calls
    receiver.answer(Answer(429, headers={"Retry-After": "1"}), Answer(408))
    stack = await make_stack(**receiver_config(receiver, delivery={"backoff_max": "5s"}, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]),
        rand=lambda: 0.5)  # jitter factor exactly 1
    ids = await stack.post(event(1))
    await stack.settle(ids["evt-1/braze"], "delivered")
    got = receiver.received()
    assert len(got) == 3
    assert got[1].at - got[0].at >= 0.95  # Retry-After: 1
    # Retry-After: 1 after the 429; plain backoff (backoff_initial 50 ms x 2) after the 408
    assert delays == [pytest.approx(1.0), pytest.approx(0.1), None]


async def test_retries_exhausted_become_failed(make_stack: Any, receiver: Receiver) -> None:
    """After max_retries retryable answers the delivery is failed (dead letter)."""
    receiver.set_default(Answer(502))
    stack = await make_stack(**receiver_config(receiver, delivery={"max_retries": 2}, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    ids = await stack.post(event(1))
    failed = await stack.settle(ids["evt-1/braze"], "failed")
    assert len(receiver.received()) == 3
    assert "retries exhausted after 3 attempts" in failed["reason"]


async def test_timeout_is_retried(make_stack: Any, receiver: Receiver) -> None:
    """A receiver slower than the timeout counts as a retryable timeout."""
    receiver.answer(Answer(200, delay=1.0))
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze",
         "timeout": "300ms"}]))
    ids = await stack.post(event(1))
    found = await stack.settle(ids["evt-1/braze"], "delivered")
    assert found["attempts"][0]["error"].startswith("timeout")
    assert found["attempts"][1]["status_code"] == 200


async def test_connection_refused_stays_pending(make_stack: Any, tmp_path: Path) -> None:
    """An unreachable endpoint keeps the delivery pending, retrying, with the error recorded."""
    port = closed_port()
    stack = await make_stack(delivery={"allowed_ports": [port], "backoff_initial": "50ms",
                                      "backoff_max": "100ms"},
                            destinations=[{"name": "braze", "format": "braze",
                                           "url": f"http://127.0.0.1:{port}/braze"}])
    ids = await stack.post(event(1))
    found = await async_eventually(lambda: stack.delivery(ids["evt-1/braze"]),
                                   lambda found: len(found["attempts"]) >= 3,
                                   what="three attempts at the unreachable endpoint")
    assert found["status"] == "pending" and len(found["attempts"]) >= 3
    assert all(a["error"].startswith("connect") for a in found["attempts"])


async def test_render_failure_fails_without_a_request(make_stack: Any, receiver: Receiver) -> None:
    """A template rendering onto a host outside allowed_hosts fails with the reason, unsent."""
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "t", "format": "template", "url": "http://{{ event.attributes.host }}/x",
         "allowed_hosts": ["127.0.0.1"], "template": {"method": "GET"}}]))
    ids = await stack.post(event(1, attributes={"host": "evil.example.com"}))
    failed = await stack.settle(ids["evt-1/t"], "failed")
    assert "not in allowed_hosts" in failed["reason"]
    assert failed["attempts"][0]["error"].startswith("render")
    assert receiver.received() == []


async def test_bulk_replay_by_destination(make_stack: Any, receiver: Receiver) -> None:
    """POST /v1/deliveries/retry replays every failed delivery of a destination."""
    receiver.answer(*[Answer(400)] * 3)
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    ids = await stack.post(event(1), event(2), event(3))
    for delivery_id in ids.values():
        await stack.settle(delivery_id, "failed")
    resp = await stack.client.post("/v1/deliveries/retry", json={"destination": "braze"})
    assert resp.status == 202 and len((await resp.json())["replayed"]) == 3
    for delivery_id in ids.values():
        await stack.settle(delivery_id, "delivered")
    bad = await stack.client.post("/v1/deliveries/retry", json={})
    assert bad.status == 400


@pytest.mark.parametrize("digits", ["1" + "0" * 5000, "-" + "9" * 4301])
async def test_a_replay_since_a_number_too_long_for_python_names_the_field(
        make_stack: Any, receiver: Receiver, digits: str) -> None:
    """An integer of over 4,300 digits is valid JSON that Python's json refuses to convert:
    it was answered as a body that is not JSON, not as a failed_since out of range."""
    stack = await make_stack(**receiver_config(receiver))
    resp = await stack.client.post("/v1/deliveries/retry",
                                   data=b'{"failed_since": ' + digits.encode() + b"}",
                                   headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "failed_since" in (await resp.json())["error"]


async def test_test_send_hides_secrets_the_receiver_echoes(make_stack: Any,
                                                           receiver: Receiver) -> None:
    """A receiver that echoes the request (many test endpoints do) showed the credentials in
    the test-send answer: the configured password, and the Basic header's base64 of it."""
    import base64
    basic = base64.b64encode(b"user:BASICPASSWORD-987654").decode()
    receiver.answer(Answer(200, headers={"X-Echo": f"Basic {basic}"},
                           body=f'{{"authorization": "Basic {basic}", "pw": "BASICPASSWORD-987654"}}'))
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "b", "format": "braze", "url": f"{receiver.url}/b",
         "auth": {"type": "basic", "username": "user", "password": "BASICPASSWORD-987654"}}]))
    answer = await (await stack.client.post("/v1/destinations/b/test")).json()
    shown = json.dumps(answer["response"])
    assert answer["response"]["status"] == 200 and "****" in shown
    assert "BASICPASSWORD" not in shown and basic not in shown, shown
    assert receiver.received("/b")[0].headers["Authorization"] == f"Basic {basic}"


async def test_test_send_hides_only_secrets_and_their_json_escaped_forms(
        make_stack: Any, receiver: Receiver) -> None:
    """An echoed X-Env: production stays readable (every non-public header value was
    hidden); an echoed API key and password are hidden also JSON-escaped (\\/ and \\")."""
    key, password = 'KEY-abc/def"ghi', "PASS/WORD-123"
    receiver.answer(Answer(200, headers={"X-Env": "production", "X-Echo-Key": key}, body=json.dumps(
        {"env": "production", "key": key, "password": password}).replace("/", "\\/")))
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "b", "format": "braze", "url": f"{receiver.url}/b",
         "headers": {"X-Env": "production", "X-Api-Key": key},
         "auth": {"type": "basic", "username": "user", "password": password}}]))
    answer = await (await stack.client.post("/v1/destinations/b/test")).json()
    response = answer["response"]
    assert response["headers"]["X-Env"] == "production"
    assert response["headers"]["X-Echo-Key"] == "****"
    assert json.loads(response["body"]) == {"env": "production", "key": "****",
                                            "password": "****"}
    assert answer["request"]["headers"]["X-Api-Key"] == "****"


async def test_activity_log_keeps_no_secret_an_echoing_receiver_returned(
        make_stack: Any, receiver: Receiver) -> None:
    """A receiver that echoes the request's headers with a 500: the attempt's stored
    excerpt has the Basic credentials, the HMAC signature and a credential header as ****
    (they were stored in clear), and the other headers as sent."""
    receiver.set_default(Answer(500, echo=True))
    key = "KEY-abc/def-123"
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "b", "format": "braze", "url": f"{receiver.url}/b",
         "headers": {"X-Env": "production", "X-Api-Key": key},
         "auth": {"type": "basic", "username": "user", "password": "PASSWORD-987654"}},
        {"name": "h", "format": "braze", "url": f"{receiver.url}/h",
         "auth": {"type": "hmac", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}]))
    ids = await stack.post(event(1))
    for name in ("b", "h"):
        found = await async_eventually(lambda n=name: stack.delivery(ids[f"evt-1/{n}"]),
                                       lambda d: d["attempt_count"] >= 1)
        (sent, *_) = receiver.received(f"/{name}")
        stored = found["attempts"][0]
        excerpt = {k.lower(): v for k, v in json.loads(stored["response_excerpt"]).items()}
        assert stored["status_code"] == 500 and excerpt["webhook-id"] == sent.headers["Webhook-Id"]
        if name == "b":
            assert sent.headers["Authorization"] != "Basic ****"
            assert excerpt["authorization"] == "Basic ****" and excerpt["x-api-key"] == "****"
            assert excerpt["x-env"] == "production"
        else:
            assert sent.headers["Webhook-Signature"] != "v1,****"
            assert excerpt["webhook-signature"] == "v1,****"


async def test_test_send_returns_request_and_response(make_stack: Any, receiver: Receiver) -> None:
    """The destination test endpoint sends now and shows the masked request and the answer."""
    receiver.answer(Answer(201, body="created"))
    stack = await make_stack(**receiver_config(receiver))
    resp = await stack.client.post("/v1/destinations/ajo/test")
    assert resp.status == 200
    answer = await resp.json()
    assert answer["request"]["headers"]["Authorization"] == "Bearer ****"
    assert answer["response"]["status"] == 201 and answer["response"]["body"] == "created"
    assert json.loads(answer["request"]["body"])["imsOrg"] == "myImsOrg"
    (got,) = receiver.received("/ajo")
    assert got.headers["Authorization"].startswith("Bearer ey")  # the real token was sent
    assert (await stack.client.post("/v1/destinations/nope/test")).status == 404



def _count_reads(stack: Any, *names: str) -> list[str]:
    """The dispatcher's spool, counting its calls of ``names`` in the returned list."""
    spool, calls = stack.dispatcher.spool, []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            if name in names:
                calls.append(name)
            return getattr(spool, name)

    stack.dispatcher.spool = Counting()
    return calls

async def test_one_event_at_a_time_costs_few_spool_reads(make_stack: Any,
                                                        receiver: Receiver) -> None:
    """At a trickle (each event delivered before the next arrives) the dispatcher does not
    read the spool at all: ingest hands it the deliveries it has just committed (offer), and
    a look that saw every due row stays true until something else changes the spool. (It
    read 5 times per delivery, then 2: 40 reads for these 20 events.)"""
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    reads = _count_reads(stack, "poll", "due", "next_due_at")
    for i in range(20):
        ids = await stack.post(event(i))
        await stack.settle(ids[f"evt-{i}/braze"], "delivered")
    assert len(receiver.received("/braze")) == 20
    assert len(reads) <= 2, reads


async def test_deliveries_offered_during_a_look_are_sent_once(make_stack: Any,
                                                              receiver: Receiver) -> None:
    """Events stored while the dispatcher is reading the spool are both offered from memory
    and in what the read returns: each is still sent exactly once."""
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    spool, looks = stack.dispatcher.spool, []

    class SlowLook:
        def __getattr__(self, name: str) -> Any:
            return getattr(spool, name)

        async def poll(self, now: float, *args: Any, **kwargs: Any) -> Any:
            looks.append(now)
            await asyncio.sleep(0.3)     # the events below are stored meanwhile
            # ... and read as due, as when their ingest began just before this look
            return await spool.poll(time.time(), *args, **kwargs)

    stack.dispatcher.spool = SlowLook()
    stack.dispatcher.wake()              # as a replay would: the next round looks
    await async_eventually(lambda: _value(len(looks)), lambda n: n >= 1, what="a look")
    ids = await stack.post(*(event(i) for i in range(5)))
    for i in range(5):
        await stack.settle(ids[f"evt-{i}/braze"], "delivered")
    await asyncio.sleep(0.3)             # a second send would have arrived by now
    got = receiver.received("/braze")
    assert sorted(r.headers["Webhook-Id"] for r in got) == sorted(ids.values())
    for i in range(5):
        assert (await stack.delivery(ids[f"evt-{i}/braze"]))["attempt_count"] == 1


async def test_a_retry_falls_due_on_time_while_new_events_stream_in(
        make_stack: Any, receiver: Receiver) -> None:
    """Offered events start without a look at the spool, but the next due time the last look
    found is kept: a retry waiting on its backoff goes out on time after the stream stops,
    not after the idle recheck (60 s)."""
    receiver.answer(Answer(500))         # the first request fails, every later one succeeds
    stack = await make_stack(**receiver_config(
        receiver, delivery={"backoff_initial": "1s", "backoff_max": "1s"},
        destinations=[{"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    first = await stack.post(event(0))
    await stack.settle(first["evt-0/braze"], "pending")
    await async_eventually(lambda: stack.delivery(first["evt-0/braze"]),
                           lambda found: found["attempt_count"] == 1, what="the first attempt")
    for i in range(1, 6):                # single events during the backoff, each offered
        await stack.post(event(i))
        await asyncio.sleep(0.05)
    await receiver.await_for(6, "/braze")
    found = await stack.settle(first["evt-0/braze"], "delivered", timeout=5)
    assert [a["status_code"] for a in found["attempts"]] == [500, 200]


async def test_a_replay_during_a_look_is_not_missed(make_stack: Any,
                                                    receiver: Receiver) -> None:
    """A look that saw every due delivery lets the dispatcher skip the next ones, but not when
    something changed while it read: a replay made then is sent at once, not after the idle
    recheck (60 s)."""
    receiver.answer(Answer(400))
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    ids = await stack.post(event(1))
    await stack.settle(ids["evt-1/braze"], "failed")
    spool, looks = stack.dispatcher.spool, []

    class SlowLook:
        def __getattr__(self, name: str) -> Any:
            return getattr(spool, name)

        async def poll(self, *args: Any, **kwargs: Any) -> Any:
            seen = await spool.poll(*args, **kwargs)
            looks.append(args)
            await asyncio.sleep(0.3)     # the replay below happens after the read
            return seen

    stack.dispatcher.spool = SlowLook()
    stack.dispatcher.wake()
    await async_eventually(lambda: _value(len(looks)), lambda n: n >= 1, what="a look")
    resp = await stack.client.post(f"/v1/deliveries/{ids['evt-1/braze']}/retry")
    assert resp.status == 202
    delivered = await stack.settle(ids["evt-1/braze"], "delivered", timeout=5)
    assert [a["status_code"] for a in delivered["attempts"]] == [400, 200]


async def test_a_look_that_saw_an_offered_row_first_sends_it_once(
        make_stack: Any, receiver: Receiver) -> None:
    """A look that reads the spool after an ingest commits, and returns before the ingest's
    answer is handled, has queued the rows the offer then brings: they go out once, and
    dispatching goes on (the same attempt recorded twice paused it for good)."""
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    spool = stack.dispatcher.spool
    ingest = spool.ingest_receipt

    async def late_answer(*args: Any, **kwargs: Any) -> Any:
        receipt = await ingest(*args, **kwargs)     # committed
        stack.dispatcher.wake()                     # a replay, a retry, a timer: a look
        await asyncio.sleep(0.3)                    # which runs before the answer is handled
        return receipt

    spool.ingest_receipt = late_answer
    ids = await stack.post(event(1))
    await stack.settle(ids["evt-1/braze"], "delivered")
    await asyncio.sleep(0.5)                        # a second send would have arrived by now
    assert len(receiver.received("/braze")) == 1
    assert stack.dispatcher.not_ready() is None
    spool.ingest_receipt = ingest
    more = await stack.post(event(2))
    await stack.settle(more["evt-2/braze"], "delivered")


async def test_rows_stored_without_an_offer_are_found_under_steady_traffic(
        make_stack: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows committed whose ingest answer never reached the server (a writer killed after its
    COMMIT) are found by a look: the idle recheck runs under steady traffic too, though every
    offer and finished attempt wakes the loop before it times out."""
    monkeypatch.setattr(relay.dispatch, "IDLE_RECHECK", 1.0)   # the backstop, shortened
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    spool = stack.dispatcher.spool
    ingest, lost = spool.ingest_receipt, [True]

    async def answer_lost_once(*args: Any, **kwargs: Any) -> Any:
        receipt = await ingest(*args, **kwargs)     # committed ...
        if lost.pop() if lost else False:
            return receipt._replace(pending=False)  # ... and the dispatcher is not told
        return receipt

    spool.ingest_receipt = answer_lost_once
    orphan = await stack.post(event(0))
    for i in range(1, 25):                          # steady traffic, one event per 0.2 s
        await stack.post(event(i))
        await asyncio.sleep(0.2)
    assert (await stack.delivery(orphan["evt-0/braze"]))["status"] == "delivered"


async def test_concurrent_senders_and_retries_send_each_delivery_once(
        make_stack: Any, receivers: Any) -> None:
    """Eight senders at once, a destination that always answers 500 (retries every 10-20 ms, so
    looks, offers and outcomes interleave): every good delivery arrives exactly once, and
    dispatching is never paused. (The first version of the offer path sent some twice, then
    paused, in 2 of 6 runs of this test.)"""
    good, bad = receivers(), receivers(Answer(500))
    stack = await make_stack(**receiver_config(
        good, delivery={"allowed_ports": [80, 443, good.port, bad.port],
                        "backoff_initial": "10ms", "backoff_max": "20ms", "max_retries": 100},
        destinations=[{"name": "braze", "format": "braze", "url": f"{good.url}/braze"},
                      {"name": "flaky", "format": "braze", "url": f"{bad.url}/flaky"}]))

    async def sender(k: int) -> None:
        for i in range(40):
            await stack.post(event(k * 1000 + i))

    await asyncio.gather(*(sender(k) for k in range(8)))
    await good.await_for(320, "/braze")
    await asyncio.sleep(0.5)                        # a second send would have arrived by now
    sent = Counter(r.headers["Webhook-Id"] for r in good.received("/braze"))
    assert len(sent) == 320 and set(sent.values()) == {1}, sent.most_common(3)
    assert len(bad.received("/flaky")) > 320        # the retries did interleave
    assert stack.dispatcher.not_ready() is None


async def _value(value: Any) -> Any:
    return value


def _slow_records(stack: Any, first_only: bool = False) -> asyncio.Event:
    """Outcomes are committed only once the returned event is set (``first_only``: the first
    outcome only)."""
    spool, release, held = stack.dispatcher.spool, asyncio.Event(), []

    class SlowRecord:
        def __getattr__(self, name: str) -> Any:
            return getattr(spool, name)

        async def record_attempt(self, *args: Any, **kwargs: Any) -> None:
            if not (first_only and held):
                held.append(1)
                await release.wait()
            await spool.record_attempt(*args, **kwargs)

    stack.dispatcher.spool = SlowRecord()
    return release


async def test_a_request_slot_takes_the_next_delivery_while_the_last_outcome_is_recorded(
        make_stack: Any, receiver: Receiver) -> None:
    """delivery.concurrency and per_host_concurrency bound requests in flight: once a response
    is in, its slots take the next delivery while the outcome is still being committed. (They
    were held until the commit, so a slow spool, or outcomes waiting to share a commit, slowed
    every host down: with concurrency 1, 3.3 ms per delivery where the receiver took 0.85.)"""
    stack = await make_stack(**receiver_config(
        receiver, delivery={"concurrency": 1, "per_host_concurrency": 1},
        destinations=[{"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    release = _slow_records(stack)
    ids = await stack.post(event(1), event(2))
    # both sent while neither outcome is committed
    await receiver.await_for(2, "/braze", timeout=5)
    assert stack.dispatcher.in_flight == 2
    release.set()
    for delivery_id in ids.values():
        found = await stack.settle(delivery_id, "delivered")
        assert found["attempt_count"] == 1
    assert len(receiver.received("/braze")) == 2


async def test_outcomes_being_recorded_do_not_hold_other_hosts_back(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """A fast host whose outcomes are still being committed does not take every request slot:
    another host's delivery goes out meanwhile (concurrency 2, per host 1)."""
    a, b = receivers(), receivers()
    stack = await make_stack(**receiver_config(
        a, delivery={"allowed_ports": [a.port, b.port], "concurrency": 2,
                     "per_host_concurrency": 1},
        destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a", "channels": ["email"]},
                      {"name": "b", "format": "braze", "url": f"{b.url}/b", "channels": ["sms"]}]))
    release = _slow_records(stack)
    await stack.post(*[event(i) for i in range(4)])            # email: host a only
    await a.await_for(2, "/a", timeout=5)
    await stack.post(event(100, channel="sms", recipient={"phone": "+15555550100"}))
    await b.await_for(1, "/b", timeout=5)     # while every outcome so far waits
    release.set()
    await a.await_for(4, "/a")


async def test_a_late_outcome_does_not_cancel_the_next_probe(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """An attempt whose outcome is committed after the host was suspended and its probe sent
    leaves that probe alone: the probe's failure suspends the host again (longer), so the next
    request waits for it. (The attempt's late clean-up once reset the probe, and the next
    request went out as soon as the probe had failed.)"""
    a = receivers(Answer(503))
    a.answer(Answer(503), Answer(503, delay=0.3))    # X fails; probe P fails after 0.3 s
    stack = await make_stack(**receiver_config(
        a, delivery={"per_host_concurrency": 1, "retry_window": "1m"},
        health={"consecutive_failures": 1, "min_failures": 100, "suspend_for": "100ms",
                "suspend_max": "10s"},
        destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a"}]))
    release = _slow_records(stack, first_only=True)   # X's outcome waits
    await stack.post(*[event(i) for i in range(4)])
    await a.await_for(2, "/a", timeout=5)             # X, then P (sent while X records)
    release.set()
    await a.await_for(3, "/a", timeout=10)
    sent = [r.at for r in a.received("/a")]
    # P fails 0.3 s after it is sent and suspends the host for 0.2 s (2nd in a row): the
    # next request cannot leave before 0.5 s after P. (A slow machine only widens the gap.)
    assert sent[2] - sent[1] >= 0.45, [round(t - sent[0], 3) for t in sent]


async def test_a_busy_host_costs_no_extra_looks(make_stack: Any,
                                                receivers: Callable[..., Receiver]) -> None:
    """Deliveries ready for a host at its limit wait in memory for its next free slot: an
    attempt whose outcome is committed after its slot was taken again does not make the
    dispatcher drop them and read the spool again (it did: 37-76 looks for these 300 events,
    5-7 before, as now)."""
    a = receivers(Answer(200, delay=0.005))
    stack = await make_stack(**receiver_config(
        a, delivery={"per_host_concurrency": 4, "concurrency": 8},
        destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a"}]))
    looks = _count_reads(stack, "poll")
    for start in range(0, 300, 50):
        await stack.post(*[event(i) for i in range(start, start + 50)])
    await a.await_for(300, "/a", timeout=60)
    assert len(looks) <= 15, len(looks)


async def test_work_waiting_for_commits_at_the_cap_starts_once_they_commit(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """When answered deliveries waiting for their outcome's commit reach their cap
    (RECORDING_MAX beyond concurrency), starts and looks wait; the commits wake the loop,
    also when the cap was reached just as the ready queue emptied (they did not, and new
    events waited for the next ingest or the 60 s recheck)."""
    a = receivers()
    stack = await make_stack(**receiver_config(
        a, delivery={"concurrency": 2, "per_host_concurrency": 2},
        destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a"}]))
    release = _slow_records(stack)
    cap = 2 + relay.dispatch.RECORDING_MAX
    for start in range(0, cap, 100):
        await stack.post(*[event(i) for i in range(start, min(cap, start + 100))])
    await a.await_for(cap, "/a", timeout=30)
    stack.dispatcher.wake()    # (a replay, a reload, another worker's ingest: a look is due)
    await stack.post(*[event(1000 + i) for i in range(5)])   # no room for them yet
    await asyncio.sleep(0.2)
    assert len(a.received("/a")) == cap
    release.set()
    await a.await_for(cap + 5, "/a", timeout=10)


async def test_a_reload_of_the_restart_only_concurrency_misses_no_wake_up(
        make_stack: Any, receivers: Callable[..., Receiver], tmp_path: Path) -> None:
    """delivery.concurrency applies after a restart: a reload that changes it leaves the
    running loop's limit, and an answer at that limit still wakes the loop for the next event
    (one compared with the reloaded value and did not: the next event waited)."""
    a = receivers(Answer(200, delay=0.5))

    def sections(concurrency: int) -> dict[str, Any]:
        return receiver_config(
            a, delivery={"concurrency": concurrency, "per_host_concurrency": 16},
            destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a"}])

    stack = await make_stack(**sections(2))
    await stack.post(event(1), event(2))
    await a.await_for(2, "/a", timeout=5)
    other = tmp_path / "reloaded"
    other.mkdir()
    stack.dispatcher.reconfigure(load_config(write_config(other, **sections(4)), env={}))
    await stack.post(event(3))
    await a.await_for(3, "/a", timeout=3)    # 0.5 s after the first two are answered


async def test_a_suspended_host_with_nothing_to_send_costs_no_looks(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """Once a host's suspension is over and nothing is left for it, the dispatcher sleeps: the
    past end of the suspension made it look at the spool again and again (5,000-6,300 looks
    a second). A delivery for the host still goes out as the probe."""
    a = receivers(Answer(503))
    stack = await make_stack(**receiver_config(
        a, delivery={"max_retries": 0},
        health={"consecutive_failures": 1, "min_failures": 100, "suspend_for": "100ms"},
        destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a"}]))
    looks = _count_reads(stack, "poll")
    ids = await stack.post(event(1))
    await stack.settle(ids["evt-1/a"], "failed")
    await asyncio.sleep(0.3)          # the suspension is over; nothing is left for the host
    before = len(looks)
    await asyncio.sleep(1.0)
    assert len(looks) - before < 5, len(looks) - before
    a.answer(Answer(200))
    more = await stack.post(event(2))
    await stack.settle(more["evt-2/a"], "delivered")


async def test_offers_for_a_live_destination_need_no_look_while_another_host_is_down(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """While one destination's host is suspended, deliveries just stored for the others are
    still started from memory: a look covers the destinations it asked for, not all or
    nothing. (Every offer was a wake-up and a look: 20 or more for these 20 events.) The held
    destination's deliveries are found by a look once its host is back."""
    a, b = receivers(), receivers(Answer(503))
    stack = await make_stack(**receiver_config(
        a, delivery={"max_retries": 5, "allowed_ports": [a.port, b.port]},
        health={"consecutive_failures": 1, "min_failures": 100, "suspend_for": "1s"},
        destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a"},
                      {"name": "b", "format": "braze", "url": f"{b.url}/b"}]))
    ids = await stack.post(event(0))
    await stack.settle(ids["evt-0/a"], "delivered")
    await b.await_for(1, "/b", timeout=5)            # b's host is suspended now
    b.set_default(Answer(200))
    looks = _count_reads(stack, "poll")
    for i in range(1, 21):
        ids = await stack.post(event(i))
        await stack.settle(ids[f"evt-{i}/a"], "delivered")
    assert len(looks) <= 3, len(looks)
    assert len(b.received("/b")) == 1
    await b.await_for(22, "/b", timeout=10)          # after the suspension: b's 21, one retried


def _sms(i: int) -> dict[str, Any]:
    return event(i, channel="sms", recipient={"phone": "+15555550100"})


def _two_hosts(a: Receiver, b: Receiver, concurrency: int) -> dict[str, Any]:
    """Destination 'a' (email) at receiver a, 'b' (sms) at receiver b, two slots per host."""
    return receiver_config(
        a, delivery={"allowed_ports": [a.port, b.port], "concurrency": concurrency,
                     "per_host_concurrency": 2},
        destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a", "channels": ["email"]},
                      {"name": "b", "format": "braze", "url": f"{b.url}/b", "channels": ["sms"]}])


class _PostDuringLook:
    """Stands in for a stack's spool: once ``armed`` holds something, its next poll notes
    ``note()`` there, stores and offers ``events`` while it reads (``posted``: their delivery
    ids), and reads them as due, as when their ingest began just before this look (as in
    test_deliveries_offered_during_a_look_are_sent_once)."""

    def __init__(self, stack: Any, events: list[dict[str, Any]], note: Callable[[], Any]) -> None:
        self.spool, self.stack, self.events, self.note = stack.dispatcher.spool, stack, events, note
        self.armed: list[Any] = []
        self.posted: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spool, name)

    async def poll(self, now: float, *args: Any, **kwargs: Any) -> Any:
        if self.armed and not self.posted:
            self.armed.append(self.note())
            await asyncio.sleep(0.2)
            self.posted.update(await self.stack.post(*self.events))
            return await self.spool.poll(time.time(), *args, **kwargs)
        return await self.spool.poll(now, *args, **kwargs)


async def test_an_offer_made_during_a_look_is_sent_once(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """A look starts while the last one still covers destination 'a' (host b just got a free
    slot, and b was dropped from the covered set by an offer while busy). An event for 'a'
    stored during that look must not be taken from memory too: the look returns it, and the
    second copy, behind b's older deliveries, was sent again once the first was committed
    (found by a review of the per-destination coverage). b's offers must be refused while
    it is busy: as on PostgreSQL (SQLite takes a busy host's offers into memory since; this
    test is about what a look does with the offers held while it reads, and the next one
    about the same with SQLite's behaviour on)."""
    a = receivers()
    a.answer(Answer(200, delay=1.5))                 # e1/a holds one of a's slots for 1.5 s
    b = receivers(Answer(200, delay=0.5))
    stack = await make_stack(**_two_hosts(a, b, concurrency=3))
    dispatcher = stack.dispatcher
    dispatcher._aside = False   # no busy host's offers taken, no looks aside
    look = _PostDuringLook(stack, [event(2)], lambda: sorted(getattr(dispatcher, "_covered", ())))
    armed, posted = look.armed, look.posted
    dispatcher.spool = look  # type: ignore[assignment]
    await stack.post(_sms(100), _sms(101))               # b busy: 2 of 2 slots for 0.5 s
    await b.await_for(2, "/b", timeout=5)
    await stack.post(event(1))                         # a round sees b busy
    await a.await_for(1, "/a", timeout=5)
    await stack.post(_sms(102), _sms(103))               # offered for b while it is busy
    armed.append("next look")
    await async_eventually(lambda: _value(len(posted)), lambda n: n >= 1, what="the look",
                           timeout=5)
    await stack.settle(posted["evt-2/a"], "delivered")
    await b.await_for(4, "/b", timeout=5)
    await asyncio.sleep(1.0)                           # a second send would be in by now
    sent = Counter(r.headers["Webhook-Id"] for r in a.received("/a"))
    record = await stack.delivery(posted["evt-2/a"])
    assert sent[posted["evt-2/a"]] == 1, sent
    assert record["attempt_count"] == 1


async def test_an_offer_during_a_look_aside_is_sent_once(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """test_an_offer_made_during_a_look_is_sent_once with SQLite's behaviour on: a busy host's
    offers wait in memory for its slots, and a look aside (another worker stored events) reads
    the idle destination meanwhile. Events stored and offered while it reads, for both, are
    also in what it returns: every delivery is still sent exactly once."""
    a = receivers()
    b = receivers(Answer(200, delay=0.4))
    stack = await make_stack(**_two_hosts(a, b, concurrency=6))
    dispatcher = stack.dispatcher
    assert dispatcher._aside   # the SQLite behaviour under test
    look = _PostDuringLook(stack, [event(2), _sms(106)], lambda: len(dispatcher._ready))
    armed, posted = look.armed, look.posted
    dispatcher.spool = look  # type: ignore[assignment]
    # Never queued while queued or under way either: the start's check for a delivery under
    # way is a second guard, which hides a second copy only while the first is in flight.
    queued: set[str] = set()
    twice: list[str] = []

    class Watched(type(dispatcher._ready)):  # type: ignore[misc]
        __slots__ = ()

        def extend(self, dues: Any) -> None:
            dues = list(dues)
            held = {d.seq for line in self._lines.values() for d in line} | \
                dispatcher._inflight.keys()
            twice.extend(due.delivery_id for due in dues if due.seq in held)
            queued.update(due.delivery_id for due in dues)
            super().extend(dues)

    dispatcher._ready.__class__ = Watched
    ids = await stack.post(_sms(100), _sms(101))          # b busy: 2 of 2 slots for 0.4 s
    await b.await_for(2, "/b", timeout=5)
    ids.update(await stack.post(*(_sms(i) for i in range(102, 106))))   # wait in memory
    armed.append("next look")
    dispatcher.others_stored()
    await async_eventually(lambda: _value(len(posted)), lambda n: n >= 2, what="the look",
                           timeout=5)
    assert armed[1] >= 1, armed   # b's offers were waiting in memory when the look began
    ids.update(posted)
    for delivery_id in ids.values():
        await stack.settle(delivery_id, "delivered", timeout=10)
    await asyncio.sleep(0.6)                              # a second send would be in by now
    sent = Counter(r.headers["Webhook-Id"] for r in [*a.received("/a"), *b.received("/b")])
    assert sent == Counter(ids.values()), sent
    assert not twice and posted["evt-2/a"] in queued, twice
    for delivery_id in ids.values():
        assert (await stack.delivery(delivery_id))["attempt_count"] == 1


async def test_events_after_an_abandoned_probe_are_sent_without_the_idle_recheck(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """The probe of a suspended host fails to render (a '..' path segment), so it is given up
    and the next request probes. The loop's last round saw the host probing: the next event
    for it must still go at once (an offer for a destination missing from that round's view
    woke nothing, and it waited for the 60 s recheck)."""
    a = receivers()
    a.answer(Answer(503))
    stack = await make_stack(**receiver_config(
        a, delivery={"max_retries": 0},
        health={"consecutive_failures": 1, "min_failures": 100, "suspend_for": "200ms"},
        destinations=[{"name": "a", "format": "template",
                       "url": a.url + "/a/{{ event.attributes.p }}",
                       "template": {"method": "POST", "body": {"type": "json", "fields": {
                           "status": "{{ event.status }}"}}}}]))
    first = await stack.post(event(1, attributes={"p": "x"}))
    await stack.settle(first["evt-1/a"], "failed")     # 503: the host is suspended
    probe = await stack.post(event(2, attributes={"p": ".."}))
    failed = await stack.settle(probe["evt-2/a"], "failed", timeout=5)   # the probe, unsent
    assert failed["attempts"][0]["error"].startswith("render")
    await asyncio.sleep(0.1)
    later = await stack.post(event(3, attributes={"p": "ok"}))
    await stack.settle(later["evt-3/a"], "delivered", timeout=5)


async def test_a_suspension_that_ends_during_a_look_does_not_leave_its_host_unlooked_for(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """A look starts while host a is suspended (its destination left out) and returns after the
    suspension ended: the loop must not sleep with 'a' unlooked for. (The round counted only
    ends still to come, and an offer for 'a' then woke nothing: it waited for the 60 s
    recheck.)"""
    a, b = receivers(), receivers()
    a.answer(Answer(503))
    stack = await make_stack(**receiver_config(
        a, delivery={"allowed_ports": [a.port, b.port], "max_retries": 0},
        health={"consecutive_failures": 1, "min_failures": 100, "suspend_for": "300ms"},
        destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a", "channels": ["email"]},
                      {"name": "b", "format": "braze", "url": f"{b.url}/b", "channels": ["sms"]}]))
    dispatcher = stack.dispatcher
    spool, slow, looked = dispatcher.spool, [], []

    class SlowLook:
        def __getattr__(self, name: str) -> Any:
            return getattr(spool, name)

        async def poll(self, now: float, *args: Any, **kwargs: Any) -> Any:
            if slow and not looked:
                looked.append(list(args[1]))          # the destinations asked for
                await asyncio.sleep(0.5)               # a's suspension ends meanwhile
            return await spool.poll(now, *args, **kwargs)

    dispatcher.spool = SlowLook()
    first = await stack.post(event(1))
    await stack.settle(first["evt-1/a"], "failed")      # 503: a suspended for 0.3 s
    slow.append(1)
    dispatcher.wake()                                   # a replay, another process: a look
    await async_eventually(lambda: _value(len(looked)), lambda n: n >= 1, what="the look",
                           timeout=5)
    await asyncio.sleep(0.7)                            # the look is over, so is the suspension
    assert looked == [["b"]]
    later = await stack.post(event(2))
    await stack.settle(later["evt-2/a"], "delivered", timeout=5)


async def test_offers_made_during_a_look_start_after_it_without_another(
        make_stack: Any, receiver: Receiver) -> None:
    """Events stored while a look is on its way back (it read the spool before they were
    committed) are offered once the look has answered: they start from memory, each once,
    and the look still counts as complete. (Every such offer made the look incomplete and
    cost another look.)"""
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    spool, looks, gate = stack.dispatcher.spool, [], asyncio.Event()

    class LateLook:
        def __getattr__(self, name: str) -> Any:
            return getattr(spool, name)

        async def poll(self, *args: Any, **kwargs: Any) -> Any:
            looks.append(1)
            batch = await spool.poll(*args, **kwargs)   # read before the events below
            if len(looks) == 1:
                await gate.wait()
            return batch

    stack.dispatcher.spool = LateLook()
    stack.dispatcher.wake()              # as a replay would: the next round looks
    await async_eventually(lambda: _value(len(looks)), lambda n: n >= 1, what="a look")
    await asyncio.sleep(0.05)            # (its read is done)
    ids = await stack.post(*(event(i) for i in range(5)))
    assert receiver.received("/braze") == []
    gate.set()
    for i in range(5):
        await stack.settle(ids[f"evt-{i}/braze"], "delivered")
    await asyncio.sleep(0.3)             # a second send would have arrived by now
    assert sorted(r.headers["Webhook-Id"] for r in receiver.received("/braze")) == \
        sorted(ids.values())
    assert len(looks) == 1, len(looks)


def _two(a: Receiver, b: Receiver, **delivery: Any) -> dict[str, Any]:
    return receiver_config(
        a, delivery={"allowed_ports": [a.port, b.port], **delivery},
        destinations=[{"name": "a", "format": "braze", "url": f"{a.url}/a", "channels": ["email"]},
                      {"name": "b", "format": "braze", "url": f"{b.url}/b", "channels": ["sms"]}])


async def test_a_wake_is_not_spent_on_a_round_that_only_drops_held_back_work(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """Host b is at its limit with one more delivery of b waiting in the ready queue. A replay
    for destination a wakes the loop: that round cannot look (the ready queue is not empty),
    drops b's waiting delivery (so the next look can see other hosts' work) and sleeps. The
    replayed delivery must go at once, not when b answers (4 s) or at the 60 s recheck."""
    a, b = receivers(), receivers(Answer(200, delay=4.0))
    a.answer(Answer(400))
    stack = await make_stack(**_two(a, b, per_host_concurrency=2, timeout="10s"))
    first = await stack.post(event(0))
    await stack.settle(first["evt-0/a"], "failed")
    await stack.post(_sms(1), _sms(2), _sms(3))   # b: two sent (4 s each), the third waits
    await b.await_for(2, "/b", timeout=5)
    await asyncio.sleep(0.1)
    assert len(stack.dispatcher._ready) == 1      # b's third, in memory
    started = time.monotonic()
    resp = await stack.client.post(f"/v1/deliveries/{first['evt-0/a']}/retry")
    assert resp.status == 202
    await a.await_for(2, "/a", timeout=8)
    took = time.monotonic() - started
    assert took < 1.0, f"the replayed delivery went {took:.1f}s after the replay"


async def test_a_replay_while_a_rate_limited_backlog_waits_in_memory_goes_at_once(
        make_stack: Any, receivers: Callable[..., Receiver]) -> None:
    """As above with b held back by its rate limit (a token every 20 s): the replayed delivery
    for a waited for b's next token."""
    a, b = receivers(), receivers(Answer(200, delay=1.0))
    a.answer(Answer(400))
    config = _two(a, b)
    config["destinations"][1]["rate_limit"] = {"per_second": 0.05, "burst": 1}
    stack = await make_stack(**config)
    first = await stack.post(event(0))
    await stack.settle(first["evt-0/a"], "failed")
    await stack.post(_sms(1), _sms(2), _sms(3))   # b: one sent, two wait for tokens
    await async_eventually(lambda: _value(stack.dispatcher.in_flight), lambda n: n == 1,
                           what="b's first in flight")
    await asyncio.sleep(0.1)
    assert len(stack.dispatcher._ready) == 2      # in memory, waiting for b's tokens
    started = time.monotonic()
    resp = await stack.client.post(f"/v1/deliveries/{first['evt-0/a']}/retry")
    assert resp.status == 202
    try:
        await a.await_for(2, "/a", timeout=3)
    except AssertionError:
        raise AssertionError("the replayed delivery was not sent within 3 s") from None
    assert time.monotonic() - started < 1.0


async def test_offers_held_during_a_look_keep_bounded_memory(make_stack: Any,
                                                              receiver: Receiver) -> None:
    """Offers made while a look is under way are kept, with their events' stored JSON, until
    it answers: within the dispatcher's byte budget for events in flight (and PREFETCH
    deliveries), the rest being found by the next look. A look that took a while (a slow
    disk, a checkpoint) while ingest went on kept every event stored meanwhile."""
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    dispatcher = stack.dispatcher
    spool, looks, gate = dispatcher.spool, [], asyncio.Event()

    class StalledLook:
        def __getattr__(self, name: str) -> Any:
            return getattr(spool, name)

        async def poll(self, *args: Any, **kwargs: Any) -> Any:
            looks.append(1)
            batch = await spool.poll(*args, **kwargs)
            if len(looks) == 1:
                await gate.wait()
            return batch

    dispatcher.spool = StalledLook()
    dispatcher.wake()
    await async_eventually(lambda: _value(len(looks)), lambda n: n >= 1, what="a look")
    pad = "x" * 200_000
    ids: dict[str, str] = {}
    for i in range(30):                      # 6 MB of events while the look is out
        ids.update(await stack.post(event(i, attributes={"pad": pad})))
    held = sum(len(body) for receipt in dispatcher._held_offers for body in receipt.bodies)
    gate.set()
    for delivery_id in ids.values():
        await stack.settle(delivery_id, "delivered")
    assert held <= relay.dispatch.INFLIGHT_BYTES, f"{held:,} bytes of events held"


async def test_no_attempt_starts_while_dispatching_is_paused(make_stack: Any,
                                                            receiver: Receiver) -> None:
    """An outcome the spool cannot take pauses dispatching ("meanwhile no new attempt
    starts"). When that happens while a look is under way, the look's batch must not be sent
    (it was: the round went on to start it)."""
    receiver.answer(Answer(200, delay=0.2))
    stack = await make_stack(**receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]))
    dispatcher = stack.dispatcher
    spool, failing, looks, posted = dispatcher.spool, [True], [], {}

    class Wrapped:
        def __getattr__(self, name: str) -> Any:
            return getattr(spool, name)

        async def record_attempt(self, *args: Any, **kwargs: Any) -> None:
            if failing:
                raise SpoolError("disk full")
            await spool.record_attempt(*args, **kwargs)

        async def poll(self, now: float, *args: Any, **kwargs: Any) -> Any:
            looks.append(1)
            if len(looks) == 1:
                posted.update(await stack.post(event(2)))   # held; committed before the read
                await asyncio.sleep(0.5)                     # event 1's outcome fails meanwhile
                return await spool.poll(time.time(), *args, **kwargs)
            return await spool.poll(now, *args, **kwargs)

    first = await stack.post(event(1))
    await async_eventually(lambda: _value(dispatcher.in_flight), lambda n: n == 1,
                           what="event 1 in flight")
    dispatcher.spool = Wrapped()
    dispatcher.wake()                                        # a look, while 1 is in flight
    await async_eventually(lambda: _value(len(posted)), lambda n: n >= 1, what="the look")
    await asyncio.sleep(0.6)
    paused = dispatcher.not_ready()
    sent = [r.headers["Webhook-Id"] for r in receiver.received("/braze")]
    failing.clear()
    assert paused is not None
    assert sent == [first["evt-1/braze"]], "an attempt started while dispatching was paused"


def test_parsed_events_stay_within_their_budgets_oldest_out_first(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The dispatcher parses an event's stored JSON once for all its deliveries, keeps at most
    EVENT_CACHE_EVENTS of them and EVENT_CACHE_BYTES (by stored size), drops the oldest first,
    and never keeps one bigger than an eighth of the bytes; with one destination it keeps none
    (an event has one delivery)."""
    one = load_config(write_config(tmp_path, destinations=[
        {"name": "braze", "format": "braze", "url": "http://127.0.0.1:9/b"}]))
    alone = relay.dispatch.Dispatcher(one, spool=None)  # type: ignore[arg-type]
    config = load_config(write_config(tmp_path, destinations=[
        {"name": "braze", "format": "braze", "url": "http://127.0.0.1:9/b"},
        {"name": "other", "format": "braze", "url": "http://127.0.0.1:9/o"}]))
    dispatcher = relay.dispatch.Dispatcher(config, spool=None)  # type: ignore[arg-type]
    parsed: list[int] = []
    real = relay.dispatch.load_event

    def counting(text: str) -> Any:
        parsed.append(len(text))
        return real(text)

    monkeypatch.setattr(relay.dispatch, "load_event", counting)

    def due(seq: int, padding: int = 900) -> Due:
        body = json.dumps({**event(seq, occurred_at="2026-12-05T10:00:00+00:00",
                                   request_id=f"r{seq}"), "attributes": {"pad": "x" * padding}})
        return Due(seq, f"dlv-{seq}", "braze", 0, 0, None, 0.0, seq, body)

    assert alone._event(due(1)) is not alone._event(due(1)) and not alone._events
    budget, most = relay.dispatch.EVENT_CACHE_BYTES, relay.dispatch.EVENT_CACHE_EVENTS
    kept = dispatcher._events

    def run(dues: list[Due]) -> None:
        parsed.clear()
        for one in dues:
            first = dispatcher._event(one)
            assert dispatcher._event(one) is first     # its other deliveries: no second parse
        assert len(parsed) == len(dues)
        assert dispatcher._event_bytes == sum(size for _, size in kept.values()) <= budget
        assert len(kept) <= most
        assert list(kept) == [one.event_seq for one in dues[-len(kept):]]   # the newest stayed

    run([due(seq) for seq in range(3 * most)])                # small events: the count binds
    assert len(kept) == most
    big = budget // 8 - 1000
    run([due(seq, padding=big) for seq in range(10_000, 10_040)])    # big ones: the bytes bind
    assert budget - big - 1000 < dispatcher._event_bytes and len(kept) < most
    huge = due(10 ** 6, padding=budget // 8)
    parsed.clear()
    dispatcher._event(huge)
    dispatcher._event(huge)
    assert huge.event_seq not in kept and len(parsed) == 2
    dispatcher.reconfigure(one)   # down to one destination: nothing kept any longer
    assert not dispatcher._events and dispatcher._event_bytes == 0
