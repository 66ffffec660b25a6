"""The whole flow through a real relay process: post, deliver, fail, replay, test-send."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import RelayProcess, event, eventually, http, write_config
from tests.receiver import Answer, Receiver, receiver_config

pytestmark = pytest.mark.slow


def test_posted_events_reach_the_receiver_once_each(tmp_path: Path, receiver: Receiver) -> None:
    """Every accepted delivery arrives, each Webhook-Id once, in the documented shapes."""
    config = write_config(tmp_path, **receiver_config(receiver))
    relay = RelayProcess(config, tmp_path / "relay.log").start()
    try:
        status, _, body = http("POST", relay.url + "/v1/events", [event(i) for i in range(30)])
        assert status == 202
        expected = {d["delivery_id"] for e in body["events"] for d in e["deliveries"]}
        assert len(expected) == 90
        got = receiver.wait_for(90)
        ids = [r.headers["Webhook-Id"] for r in got]
        assert set(ids) == expected and len(ids) == len(set(ids))
        ajo = [json.loads(r.body) for r in got if r.path == "/ajo"]
        assert {a["messageExecution"]["messageExecutionID"] for a in ajo} == \
            {f"msg-{i}" for i in range(30)}
    finally:
        relay.stop()


def test_failed_delivery_replayed_with_the_cli(tmp_path: Path, receiver: Receiver) -> None:
    """A 400 lands in the dead letter; `relay replay --destination` sends it again."""
    receiver.answer(Answer(400, body="nope"))
    config = write_config(tmp_path, **receiver_config(receiver, destinations=[
        {"name": "braze", "format": "braze", "url": f"{receiver.url}/braze"}]),
        server={"listen": "127.0.0.1:0", "token": "s3cret"})
    relay = RelayProcess(config, tmp_path / "relay.log").start()
    auth = {"Authorization": "Bearer s3cret"}
    try:
        status, _, body = http("POST", relay.url + "/v1/events", event(1), headers=auth)
        assert status == 202
        delivery_id = body["events"][0]["deliveries"][0]["delivery_id"]
        receiver.wait_for(1)
        found = eventually(
            lambda: http("GET", f"{relay.url}/v1/deliveries/{delivery_id}", headers=auth)[2],
            lambda found: found["status"] == "failed", what=f"{delivery_id} to become failed",
            timeout=5, interval=0.05)
        assert found["status"] == "failed" and found["attempts"][0]["response_excerpt"] == "nope"
        # the CLI reads server.listen from the config: point it at the port actually bound
        port = relay.url.rsplit(":", 1)[1]
        live = tmp_path / "live.yaml"
        live.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        out = subprocess.run([sys.executable, "-m", "relay", "replay", "-c", str(live),
                              "--destination", "braze"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"replayed 1 delivery\n{delivery_id}\n"
        receiver.wait_for(2)
    finally:
        relay.stop()


def test_relay_test_command(tmp_path: Path, receiver: Receiver) -> None:
    """`relay test` sends a synthetic event and prints the masked request and the answer."""
    config = write_config(tmp_path, **receiver_config(receiver))
    out = subprocess.run([sys.executable, "-m", "relay", "test", "-c", str(config), "braze"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["outcome"] == "delivered" and answer["response"]["status"] == 200
    assert answer["request"]["headers"]["webhook-signature"] == "v1,****"
    (got,) = receiver.received("/braze")
    assert json.loads(got.body)["dispatch_id"].startswith("relay-test-")
