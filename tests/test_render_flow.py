"""From POST to payload: what is stored renders to the fixtures; `relay render` prints curl."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from relay.events import load_event
from tests.helpers import FIXTURES, ROOT
from tests.test_payloads import build_renderers

AJO_EVENT = {
    "id": "evt-ajo-1", "channel": "email", "status": "bounced", "message_id": "HUMA-26362805",
    "request_id": "8NoByJneShCdCGRnrGS1t1m3CdA73dhR",
    "campaign_id": "16f24a15-7e21-477c-848a-d5695ca7f137",
    "campaign_version_id": "2ca10c10-56dd-4505-87cd-fa5da84e7a5d",
    "failure": {"category": "sync", "type": "Ignored", "code": "25", "reason": "Admin Failure"},
    "recipient": {"email": "john.doe@luma.com"},
}


async def test_posted_event_renders_to_the_ajo_fixture(make_stack: Any) -> None:
    """The event posted to /v1/events, read back from the spool, renders to the AJO fixture."""
    stack = await make_stack(dispatch=False)
    resp = await stack.client.post("/v1/events", json=AJO_EVENT)
    assert resp.status == 202
    deliveries = {d["destination"]: d["delivery_id"]
                  for d in (await resp.json())["events"][0]["deliveries"]}
    stored = await stack.spool.event_json(deliveries["ajo"])
    assert stored is not None
    request = build_renderers(stack.config)["ajo"].render(load_event(stored), deliveries["ajo"])
    assert json.loads(request.body) == json.loads((FIXTURES / "ajo_feedback_bounce.json")
                                                  .read_text())


def test_relay_render_prints_a_curl_command(tmp_path: Path) -> None:
    """`relay render` prints the request and a curl command whose body is exactly the payload."""
    event = tmp_path / "event.json"
    event.write_text(json.dumps(AJO_EVENT))
    config = tmp_path / "relay.yaml"
    config.write_text((ROOT / "config.example.yaml").read_text())
    out = subprocess.run([sys.executable, "-m", "relay", "render", "-c", str(config),
                          "--destination", "ajo-example", str(event)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# ajo-example (ajo)")
    assert "POST http://127.0.0.1:9000/ajo" in out.stdout
    assert "Authorization: Bearer ****" in out.stdout  # the JWT itself is masked
    curl = out.stdout.split("# the same as curl:\n", 1)[1].replace("\\\n", " ")
    words = shlex.split(curl)
    assert words[:3] == ["curl", "-X", "POST"]
    body = json.loads(words[words.index("--data-binary") + 1])
    expected = json.loads((FIXTURES / "ajo_feedback_bounce.json").read_text())
    assert body == {**expected, "imsOrg": "myImsOrg"}
    assert any(w.startswith("Webhook-Id: dlv_") for w in words)


def test_relay_render_explains_skips_and_errors(tmp_path: Path) -> None:
    """Skipped statuses are explained (exit 0); bad events and unknown names exit 1."""
    def render(destination: str, event: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "render", "-c",
                               str(ROOT / "config.example.yaml"), "-d", destination, "-"],
                              input=json.dumps(event), capture_output=True, text=True)

    skipped = render("ajo-example", {"channel": "email", "status": "processed", "message_id": "m"})
    assert skipped.returncode == 0
    assert "skipped: format ajo cannot express status 'processed'" in skipped.stdout
    bad = render("ajo-example", {"channel": "email"})
    assert bad.returncode == 1 and "message_id: required field is missing" in bad.stderr
    unknown = render("nope", {"channel": "email", "status": "sent", "message_id": "m"})
    assert unknown.returncode == 1 and "ajo-example, braze-example, crm-example" in unknown.stderr


def test_relay_render_takes_an_event_as_the_spool_keeps_it(tmp_path: Path) -> None:
    """A stored event's traceparent (the relay's record of its ingest request's header, refused
    in a posted event) does not stop `relay render`; a malformed one is still refused."""
    def render(event: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "render", "-c",
                               str(ROOT / "config.example.yaml"), "-d", "braze-example", "-"],
                              input=json.dumps(event), capture_output=True, text=True)

    stored = {"channel": "email", "status": "delivered", "message_id": "m-1",
              "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    out = render(stored)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout.split("\n\n", 2)[1])   # the request's body, after its headers
    assert body["dispatch_id"] == "m-1"
    bad = render({**stored, "traceparent": "not-a-trace"})
    assert bad.returncode == 1 and "traceparent: unknown field" in bad.stderr
