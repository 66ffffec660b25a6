"""Egress: event data cannot steer requests. Each attack the issue found, refused with the real
sending client and loopback receivers (and a resolver stub for names that map to internal
addresses)."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from relay.config import parse_config
from relay.destinations import compile_destinations
from relay.egress import Blocked, GuardedResolver
from relay.errors import ConfigError, RenderError
from relay.events import Event
from relay.request import Request
from relay.transport import AiohttpTransport
from tests.helpers import event, write_config
from tests.receiver import Answer, Receiver, closed_port


def renderer(port: int, url: str, **dest: Any) -> Any:
    config = parse_config(json.dumps({
        "delivery": {"allowed_ports": [80, 443, port, port + 1],
                     "allowed_networks": ["127.0.0.0/8"]},
        "destinations": [{"name": "t", "format": "template", "url": url,
                          "template": {"method": "PUT"}, **dest}]}), env={})
    return compile_destinations(config)["t"].renderer


def ev(**attributes: Any) -> Event:
    return Event(channel="email", status="sent", message_id=attributes.pop("message_id", "m"),
                 attributes=attributes)


def test_userinfo_from_event_data_is_refused() -> None:
    """attacker:pw@allowed-host in a templated host never becomes an Authorization header."""
    r = renderer(8080, "http://{{ event.attributes.h }}/x", allowed_hosts=["127.0.0.1:8080"])
    with pytest.raises(RenderError, match="userinfo"):
        r.render(ev(h="attacker:pw@127.0.0.1:8080"), "d")
    assert r.render(ev(h="127.0.0.1:8080"), "d").url == "http://127.0.0.1:8080/x"


def test_ports_from_event_data_stay_on_the_destinations_own() -> None:
    """A templated host cannot pick any port of delivery.allowed_ports: only the URL's own
    port (default), its allowed_ports, or a host:port entry."""
    plain = renderer(8080, "http://{{ event.attributes.h }}/x", allowed_hosts=["127.0.0.1"])
    assert plain.render(ev(h="127.0.0.1"), "d").url == "http://127.0.0.1/x"
    with pytest.raises(RenderError, match="port 8080"):
        plain.render(ev(h="127.0.0.1:8080"), "d")
    pinned = renderer(8080, "http://{{ event.attributes.h }}/x",
                      allowed_hosts=["127.0.0.1:8080"])
    with pytest.raises(RenderError, match="port 8081"):
        pinned.render(ev(h="127.0.0.1:8081"), "d")
    listed = renderer(8080, "http://127.0.0.1:8080/{{ event.attributes.p }}",
                      allowed_ports=[8080])
    assert listed.render(ev(p="a"), "d").url == "http://127.0.0.1:8080/a"


@pytest.mark.parametrize("value", ["..", ".", "%2e%2e", "%2E.", "../../admin"])
def test_dot_segments_from_event_data_are_refused(value: str) -> None:
    """The README's own example: message_id '..' must not climb out of /crm/."""
    r = renderer(443, "https://crm.example.com/crm/{{ event.message_id }}")
    with pytest.raises(RenderError, match="path segment"):
        r.render(ev(message_id=value), "d")


def test_the_rendered_url_is_the_normalised_one_sent() -> None:
    """render shows what aiohttp sends: normalised by yarl, the configured path kept."""
    r = renderer(443, "https://CRM.example.com/crm/{{ event.message_id | url_encode }}")
    assert r.render(ev(message_id="a b/c"), "d").url == "https://crm.example.com/crm/a+b%2Fc"


def test_static_userinfo_and_outside_ports_are_config_errors() -> None:
    """Userinfo in a configured URL, and a destination port outside delivery.allowed_ports,
    fail at load with their paths."""
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps({"destinations": [
            {"name": "a", "format": "braze", "url": "https://u:p@h.example.com/x"},
            {"name": "b", "format": "braze", "url": "https://h.example.com/x",
             "allowed_ports": [8443]},
            {"name": "c", "format": "template", "url": "https://{{ event.x }}/",
             "allowed_hosts": ["h.example.com:9999"], "template": {"method": "GET"}}]}), env={})
    found = dict(info.value.problems)
    assert "userinfo" in found["destinations[0].url"]
    assert "8443" in found["destinations[1].allowed_ports[0]"]
    assert "9999" in found["destinations[2].allowed_hosts[0]"]


def test_control_characters_in_a_rendered_header_are_refused() -> None:
    """Not only CR/LF: any control character in a header value is a render error."""
    r = renderer(443, "https://crm.example.com/x", headers={"X-A": "{{ event.attributes.v }}"})
    for bad in ("a\x00b", "a\x1bb", "a\x7fb", "a\nX-Injected: 1"):
        with pytest.raises(RenderError, match="control character"):
            r.render(ev(v=bad), "d")
    assert r.render(ev(v="tab\tok"), "d").headers["X-A"] == "tab\tok"


class StubResolver:
    """Names -> addresses, as a resolver would answer (no DNS)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": self.names[host], "port": port, "family": family,
                 "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1",
                                     "169.254.169.254", "100.64.0.1", "::1", "fd00::1",
                                     "fe80::1", "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe"])
async def test_names_that_resolve_to_internal_addresses_are_refused(address: str) -> None:
    """A public-looking allowed name that resolves to loopback, RFC 1918, CGNAT, link-local
    (the metadata address), unique-local or a mapped form of those is refused."""
    resolver = GuardedResolver((), StubResolver({"crm.example.com": address}))
    with pytest.raises(Blocked, match=r"delivery\.allowed_networks"):
        await resolver.resolve("crm.example.com", 443)
    public = GuardedResolver((), StubResolver({"crm.example.com": "93.184.215.14"}))
    assert (await public.resolve("crm.example.com", 443))[0]["host"] == "93.184.215.14"


async def test_the_sending_client_refuses_internal_addresses_unless_allowed(tmp_path: Path) -> None:
    """With the real client: an IP literal on loopback fails (not retried) naming the address
    and the key; listed in allowed_networks, the same request arrives."""
    with Receiver(Answer(200)) as receiver:
        base = {"destinations": [{"name": "b", "format": "braze", "url": f"{receiver.url}/b"}]}
        # (a config naming the loopback literal is refused at check time now: the client is
        # given one naming a host, and asked for the literal, as a templated url could ask)
        named = {"destinations": [{"name": "b", "format": "braze",
                                   "url": f"http://receiver.example:{receiver.port}/b"}]}
        closed = parse_config(json.dumps({**named, "delivery": {"allowed_ports": [receiver.port]}}),
                              env={})
        transport = AiohttpTransport(closed)
        try:
            got = await transport.handle_request(Request("POST", f"{receiver.url}/b"), 5)
        finally:
            await transport.close()
        assert got.error == "blocked" and "127.0.0.1" in got.detail
        assert "delivery.allowed_networks" in got.detail and receiver.received() == []
        opened = parse_config(json.dumps({**base, "delivery": {
            "allowed_ports": [receiver.port], "allowed_networks": ["127.0.0.0/8"]}}), env={})
        transport = AiohttpTransport(opened)
        try:
            got = await transport.handle_request(Request("POST", f"{receiver.url}/b"), 5)
        finally:
            await transport.close()
        assert got.status == 200 and len(receiver.received()) == 1


async def test_a_failed_attempt_leaves_no_cycle_holding_its_body() -> None:
    """aiohttp's frames hold the exception they raise, so a refused attempt's exception,
    traceback and frames formed a cycle that kept the request body alive until the collector
    ran (every 10,000 allocations while serving): with a destination down, ~120 bodies could
    wait for it instead of ~8. The transport cuts the tracebacks: no body is left to the
    collector."""
    port = closed_port()
    url = f"http://127.0.0.1:{port}/b"
    config = parse_config(json.dumps({
        "delivery": {"allowed_ports": [port], "allowed_networks": ["127.0.0.0/8"]},
        "destinations": [{"name": "b", "format": "braze", "url": url}]}), env={})
    transport = AiohttpTransport(config)
    bodies = [bytes([65 + i]) * 100_000 for i in range(10)]
    try:
        await transport.handle_request(Request("POST", url, {}, b"warm"), 5)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
        try:
            errors = {(await transport.handle_request(Request("POST", url, {}, body), 5)).error
                      for body in bodies}
            gc.collect()
            ours = {id(body) for body in bodies}
            held = sum(1 for found in gc.garbage for ref in gc.get_referents(found)
                       if id(ref) in ours)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    finally:
        await transport.close()
    assert errors == {"connect"}
    assert held == 0


async def test_the_clients_url_cache_keeps_each_verdict_and_stays_bounded() -> None:
    """The transport parses and checks each URL once (URL_CACHE of them): a refused literal is
    refused every time, an allowed one is sent every time, and many distinct templated URLs
    do not grow the cache past its bound."""
    from relay.transport import URL_CACHE

    with Receiver(Answer(200)) as receiver:
        config = parse_config(json.dumps({
            "delivery": {"allowed_ports": [receiver.port], "allowed_networks": ["127.0.0.0/8"]},
            "destinations": [{"name": "b", "format": "braze", "url": f"{receiver.url}/b"}]}),
            env={})
        transport = AiohttpTransport(config)
        try:
            sent = [await transport.handle_request(Request("POST", f"{receiver.url}/b"), 5)
                    for _ in range(2)]
            refused = [await transport.handle_request(
                Request("POST", f"http://10.0.0.1:{receiver.port}/p"), 5) for _ in range(3)]
            invalid = await transport.handle_request(Request("POST", "http://[::1"), 5)
            via = SimpleNamespace(ssl=None, server_name=None, proxy=SimpleNamespace(
                url=f"http://10.0.0.2:{receiver.port}", username=None))
            behind = [await transport.handle_request(
                Request("POST", f"{receiver.url}/b", via=via), 5) for _ in range(2)]
            again = await transport.handle_request(Request("POST", f"{receiver.url}/b"), 5)
        finally:
            await transport.close()
        assert [e.status for e in [*sent, again]] == [200, 200, 200]
        assert {(e.error, "10.0.0.1" in e.detail) for e in refused} == {("blocked", True)}
        assert invalid.error == "invalid_url"
        assert [(e.error, "10.0.0.2" in e.detail) for e in behind] == [("blocked", True)] * 2
        assert len(receiver.received()) == 3
        many = AiohttpTransport(config)
        for i in range(URL_CACHE + 200):
            got = await many.handle_request(Request("POST", f"http://10.9.9.9/p{i}"), 5)
            assert got.error == "blocked"
        assert len(many._urls) == URL_CACHE
        await many.close()


def test_blocked_is_a_final_failure_not_a_retry() -> None:
    """A refused address fails the delivery at once (and is not a host-health failure)."""
    from relay.health import counts_as_failure
    from relay.policy import classify_error

    outcome = classify_error("blocked", "address 127.0.0.1 ...")
    assert outcome.kind == "failed" and not counts_as_failure(outcome)


async def test_an_event_chosen_endpoint_can_only_suspend_itself(make_stack: Any) -> None:
    """300 events aimed at a closed port suspend that endpoint, not the destination: deliveries
    to the good endpoint keep arriving, and /v1/hosts shows both."""
    bad = closed_port()
    with Receiver(Answer(200)) as good:
        stack = await make_stack(
            delivery={"allowed_ports": [good.port, bad], "backoff_initial": "50ms",
                      "backoff_max": "200ms", "timeout": "2s"},
            health={"consecutive_failures": 3, "suspend_for": "30s"},
            destinations=[{"name": "crm", "format": "template",
                           "url": "http://127.0.0.1:{{ event.attributes.port }}/x",
                           "allowed_hosts": ["127.0.0.1"], "allowed_ports": [good.port, bad],
                           "template": {"method": "POST"}}])
        # more than one due batch (256) aimed at the dead endpoint: they must not fill every
        # fetch in front of the good endpoint's deliveries
        for first in range(0, 300, 100):
            await stack.post(*[event(i, attributes={"port": bad})
                               for i in range(first, first + 100)])
        for _ in range(300):
            hosts = (await (await stack.client.get("/v1/hosts")).json())["hosts"]
            states = {h["host"]: h["state"] for h in hosts}
            if states.get(f"http://127.0.0.1:{bad}") == "suspended":
                break
            await asyncio.sleep(0.05)
        assert states[f"http://127.0.0.1:{bad}"] == "suspended"
        await stack.post(*[event(1000 + i, attributes={"port": good.port}) for i in range(5)])
        await good.await_for(5)
        hosts = (await (await stack.client.get("/v1/hosts")).json())["hosts"]
        assert {h["host"]: h["state"] for h in hosts}.get(f"http://127.0.0.1:{good.port}",
                                                           "healthy") == "healthy"


def test_example_config_opts_in_to_loopback_only(tmp_path: Path) -> None:
    """The example config (and the test receivers) list loopback explicitly; nothing else."""
    from relay.config import load_config
    from tests.helpers import ROOT

    assert load_config(ROOT / "config.example.yaml", env={"RELAY_TOKEN": "t"}) \
        .delivery.allowed_networks == ("127.0.0.0/8",)
    assert "127.0.0.0/8" in json.dumps(write_config(tmp_path).read_text())
