"""docs/openapi.yaml is a valid OpenAPI 3.1 document, names every route of the app, and real
answers of the main paths match the schemas it gives for them."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate

from relay.config import parse_config
from relay.server import create_app
from tests.helpers import ROOT, event
from tests.receiver import Answer, Receiver, receiver_config

SPEC: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def check(path: str, method: str, status: int, body: Any) -> None:
    """``body`` matches the document's schema for this path, method and status."""
    operation = SPEC["paths"][path][method.lower()]
    assert str(status) in operation["responses"], f"{method} {path}: {status} is not documented"
    response = _resolve(operation["responses"][str(status)])
    schema = response["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": SPEC["components"]}).validate(body)


def test_document_is_valid_openapi_3_1() -> None:
    """openapi-spec-validator accepts the document as OpenAPI 3.1."""
    assert SPEC["openapi"].startswith("3.1")
    validate(SPEC)


def test_every_route_is_documented() -> None:
    """Each path and method the app serves is in the document, and nothing else is."""
    app = create_app(parse_config("", env={}), spool=None)  # type: ignore[arg-type]
    served = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    documented = {(p, m) for p, ops in SPEC["paths"].items() for m in ops}
    assert served == documented


async def test_real_answers_match_the_document(make_stack: Any, receiver: Receiver) -> None:
    """Ingest, duplicates, errors, the activity log, one delivery, replays, a test send, hosts
    and the probes answer as the document says."""
    receiver.default = Answer(400, body="no")
    stack = await make_stack(**receiver_config(receiver))
    client = stack.client

    async def call(method: str, url: str, path: str, **kwargs: Any) -> Any:
        resp = await client.request(method, url, **kwargs)
        body = await resp.json()
        check(path, method, resp.status, body)
        return resp.status, body

    status, answer = await call("POST", "/v1/events", "/v1/events", json=event(1))
    assert status == 202
    assert (await call("POST", "/v1/events", "/v1/events", json=event(1)))[0] == 200
    assert (await call("POST", "/v1/events", "/v1/events", json={"channel": "fax"}))[0] == 400
    assert (await call("POST", "/v1/events", "/v1/events", data=b"x",
                       headers={"Content-Type": "text/plain"}))[0] == 415
    delivery_id = answer["events"][0]["deliveries"][0]["delivery_id"]
    record = await stack.settle(delivery_id, "failed")
    assert record["attempts"]
    status, page = await call("GET", "/v1/deliveries?status=failed&limit=1", "/v1/deliveries")
    assert status == 200 and page["deliveries"]
    assert (await call("GET", "/v1/deliveries?status=nope", "/v1/deliveries"))[0] == 400
    assert (await call("GET", "/v1/deliveries?state=failed", "/v1/deliveries"))[0] == 400
    assert (await call("GET", f"/v1/deliveries/{delivery_id}?x=1",
                       "/v1/deliveries/{delivery_id}"))[0] == 400
    assert (await call("GET", "/v1/hosts?state=suspended", "/v1/hosts"))[0] == 400
    one = f"/v1/deliveries/{delivery_id}"
    assert (await call("GET", one, "/v1/deliveries/{delivery_id}"))[0] == 200
    assert (await call("GET", "/v1/deliveries/dlv_none", "/v1/deliveries/{delivery_id}"))[0] == 404
    receiver.default = Answer(200)
    assert (await call("POST", one + "/retry", "/v1/deliveries/{delivery_id}/retry"))[0] == 202
    assert (await call("POST", one + "/retry", "/v1/deliveries/{delivery_id}/retry"))[0] == 409
    status, replayed = await call("POST", "/v1/deliveries/retry", "/v1/deliveries/retry",
                                  json={"failed_since": 0})
    assert status == 202 and isinstance(replayed["replayed"], list)
    assert (await call("POST", "/v1/deliveries/retry", "/v1/deliveries/retry", json={}))[0] == 400
    assert (await call("POST", "/v1/deliveries/retry", "/v1/deliveries/retry",
                       json={"destination": "nope"}))[0] == 400
    status, sent = await call("POST", "/v1/destinations/braze/test", "/v1/destinations/{name}/test")
    assert status == 200 and sent["outcome"] == "delivered"
    assert (await call("POST", "/v1/destinations/nope/test",
                       "/v1/destinations/{name}/test"))[0] == 404
    status, hosts = await call("GET", "/v1/hosts", "/v1/hosts")
    assert status == 200 and hosts["hosts"]
    assert (await call("GET", "/healthz", "/healthz"))[0] == 200
    assert (await call("GET", "/readyz", "/readyz"))[0] == 200
    metrics = await client.get("/metrics")
    assert metrics.status == 200 and "relay_events_accepted_total" in await metrics.text()


async def test_token_errors_match_the_document(make_stack: Any) -> None:
    """A missing token is a documented 401 with WWW-Authenticate."""
    stack = await make_stack(dispatch=False, server={"token": "abcdef123456"})
    resp = await stack.client.get("/v1/hosts")
    assert resp.status == 401 and "WWW-Authenticate" in resp.headers
    check("/v1/hosts", "GET", 401, await resp.json())
    resp = await stack.client.get("/v1/hosts", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401 and "wrong Bearer token" in (await resp.json())["error"]
    check("/v1/hosts", "GET", 401, await resp.json())


@pytest.mark.parametrize("path", sorted(SPEC["paths"]))
def test_every_operation_has_a_summary(path: str) -> None:
    """Each operation says what it does."""
    for operation in SPEC["paths"][path].values():
        assert operation.get("summary")
