"""Fuzzing with hypothesis against the real HTTP app: valid batches are always stored, broken
input always gets a 4xx naming a path, generated configs either load and run or fail with
paths, and the relay keeps serving throughout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import Config, load_config, validate_config
from relay.destinations import compile_destinations
from relay.errors import ConfigError
from relay.routing import Router
from tests.helpers import ServerThread, http, write_config
from tests.test_payloads import local_events

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    config = load_config(write_config(tmp_path_factory.mktemp("fuzz")), env={})
    with ServerThread(config) as server:
        yield server


@FUZZ
@given(st.lists(local_events, min_size=1, max_size=20))
def test_valid_batches_are_always_stored(live: ServerThread, batch: list[dict[str, Any]]) -> None:
    """Any batch of valid events gets 202 (or 200 when all are repeats), one entry each."""
    status, _, answer = http("POST", live.url + "/v1/events", json.dumps(batch).encode())
    assert status in (200, 202), answer
    assert len(answer["events"]) == len(batch)


def _break(event: dict[str, Any], how: int) -> tuple[dict[str, Any], str]:
    broken = dict(event)
    if how == 0:
        broken.pop("channel")
        return broken, "channel"
    if how == 1:
        broken["status"] = "lost"
        return broken, "status"
    if how == 2:
        broken["retry_count"] = -1
        return broken, "retry_count"
    broken["occurred_at"] = "not a time"
    return broken, "occurred_at"


@FUZZ
@given(st.lists(local_events, min_size=1, max_size=10), st.data())
def test_one_broken_event_rejects_the_batch_with_its_path(live: ServerThread,
                                                          batch: list[dict[str, Any]],
                                                          data: st.DataObject) -> None:
    """Breaking one event of a valid batch gives 400 naming exactly that element and field."""
    index = data.draw(st.integers(0, len(batch) - 1))
    batch[index], field = _break(batch[index], data.draw(st.integers(0, 3)))
    status, _, answer = http("POST", live.url + "/v1/events", json.dumps(batch).encode())
    assert status == 400
    assert f"[{index}].{field}" in {d["path"] for d in answer["details"]}
    assert http("GET", live.url + "/healthz")[0] == 200


names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
urls = st.sampled_from(["https://h.example.com/x", "http://127.0.0.1:80/y", "ftp://x",
                        "https://{{ event.attributes.host }}/z", "not a url", ""])
auths = st.one_of(
    st.just({"type": "none"}),
    st.fixed_dictionaries({"type": st.just("bearer"), "token": st.text(max_size=10)}),
    st.fixed_dictionaries({"type": st.just("hmac"), "secret": st.sampled_from(
        ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_%%", "plain"])}),
    st.fixed_dictionaries({"type": st.just("jwt"), "key": st.sampled_from(["k" * 40, "short"]),
                           "algorithm": st.sampled_from(["HS256", "RS256", "HS999"])}),
)
destinations = st.fixed_dictionaries(
    {"name": names, "format": st.sampled_from(["ajo", "braze", "template", "fax"]), "url": urls},
    optional={
        "auth": auths,
        "statuses": st.lists(st.sampled_from(["sent", "processed", "delayed", "bounced"]),
                             max_size=3),
        "channels": st.lists(st.sampled_from(["email", "sms", "fax"]), max_size=2),
        "ajo": st.just({"ims_org": "o", "sandbox": {"id": "s", "name": "n"}}),
        "allow_insecure_http": st.booleans(),
        "allowed_hosts": st.lists(st.sampled_from(["h.example.com", "127.0.0.1"]), max_size=2),
        "template": st.fixed_dictionaries({}, optional={
            "method": st.sampled_from(["GET", "POST", "FETCH"]),
            "body": st.one_of(
                st.fixed_dictionaries({"type": st.just("json"), "fields": st.dictionaries(
                    names, st.sampled_from(["{{ event.status }}", "{{ x", "plain"]),
                    max_size=2)}),
                st.fixed_dictionaries({"type": st.just("raw"), "template": st.sampled_from(
                    ["a={{ event.message_id | url_encode }}", "{% if %}"])}))}),
        "timeout": st.sampled_from(["5s", "0s", "soon"]),
    })
configs = st.fixed_dictionaries({"destinations": st.lists(destinations, max_size=4)}, optional={
    "delivery": st.fixed_dictionaries({}, optional={
        "allowed_ports": st.lists(st.integers(0, 70000), max_size=3),
        "backoff_initial": st.sampled_from(["1s", "20m"]), "max_retries": st.integers(-1, 200)}),
    "health": st.fixed_dictionaries({}, optional={"failure_rate": st.floats(-1, 2),
                                                  "suspend_for": st.sampled_from(["1s", "2h"])}),
})


@settings(max_examples=300, deadline=None)
@given(configs)
def test_generated_configs_load_and_run_or_name_paths(raw: dict[str, Any]) -> None:
    """A generated config either loads and builds every runtime part (routing, renderers,
    signers, retry policies), or fails with a ConfigError whose every problem has a path."""
    try:
        config = validate_config(raw, env={}, base_dir=Path("/nonexistent"))
        compile_destinations(config)
    except ConfigError as exc:
        assert exc.problems
        assert all(path for path, _ in exc.problems), exc.problems
        return
    assert isinstance(config, Config)
    Router(config)
    compile_destinations(config)
