"""Secrets never show (issue 15): config errors, reload logs, render, log masking, spool file
modes; closed by default; the check-config warning for JSON bodies without the json filter."""

from __future__ import annotations

import io
import json
import logging
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.auth import destination_secrets, mask
from relay.config import load_config, parse_config
from relay.errors import ConfigError
from relay.logs import JsonFormatter, MaskSecrets, config_secrets
from relay.redact import Echoes, hide, is_credential
from relay.reload import ConfigWatcher
from relay.request import Request
from tests.helpers import RelayProcess, event, http, write_config

NUMERIC = 918273645546372819


def relay(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


def template_dest(**extra: Any) -> dict[str, Any]:
    return {"name": "crm", "format": "template", "url": "https://h.example.com/x",
            "template": {"method": "POST",
                         "body": {"type": "json", "fields": {"s": "{{ event.status }}"}}},
            **extra}


# -- A: secrets never show ------------------------------------------------------------------


def test_check_config_never_prints_a_numeric_token(tmp_path: Path) -> None:
    """A numeric server.token or bearer token is refused by path, without its value."""
    dest = {**template_dest(), "auth": {"type": "bearer", "token": NUMERIC + 1}}
    path = write_config(tmp_path, server={"token": NUMERIC}, destinations=[dest])
    out = relay("check-config", str(path), cwd=tmp_path)
    assert out.returncode == 1
    assert "server.token" in out.stderr and "destinations[0].auth.token" in out.stderr
    assert str(NUMERIC) not in out.stderr + out.stdout
    assert str(NUMERIC + 1) not in out.stderr + out.stdout


def test_validation_errors_hide_values_of_secret_named_keys(tmp_path: Path) -> None:
    """Any key naming a secret, and any header value, is reported without its value; an
    ordinary key still shows what was given."""
    dest = {**template_dest(), "headers": {"X-Auth": 4242424242},
            "auth": {"type": "jwt", "key": 5151515151}, "max_retries": "many"}
    path = write_config(tmp_path, destinations=[dest])
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    found = dict(info.value.problems)
    assert set(found) >= {"destinations[0].headers.X-Auth", "destinations[0].auth.key",
                          "destinations[0].max_retries"}
    assert "4242424242" not in str(info.value) and "5151515151" not in str(info.value)
    assert "'many'" in found["destinations[0].max_retries"]  # not a secret: the value helps


async def test_failed_reload_log_never_shows_a_numeric_token(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reload refused for a numeric token logs the path, never the number."""
    path = write_config(tmp_path)
    watcher = ConfigWatcher(str(path), load_config(path, env={}), lambda loaded: None)
    write_config(tmp_path, server={"token": NUMERIC})
    with caplog.at_level(logging.ERROR, logger="relay.reload"):
        assert await watcher.reload("test") is False
    assert "server.token" in caplog.text and str(NUMERIC) not in caplog.text


def test_render_masks_custom_headers_and_query_values(tmp_path: Path) -> None:
    """`relay render` shows neither a custom header's value nor a configured query value."""
    dest = template_dest(url="https://h.example.com/x?api_key=qs-secret&v=2",
                         headers={"X-Braze-Key": "secret-abc"})
    path = write_config(tmp_path, destinations=[dest])
    (tmp_path / "event.json").write_text(json.dumps(event(1)))
    out = relay("render", "-c", str(path), "-d", "crm", str(tmp_path / "event.json"),
                cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "secret-abc" not in out.stdout and "qs-secret" not in out.stdout
    assert "X-Braze-Key: ****" in out.stdout and "api_key=****" in out.stdout
    assert "Content-Type: application/json" in out.stdout


def test_mask_keeps_public_headers_and_templated_query_values(tmp_path: Path) -> None:
    """Public headers and query values that come from event data stay readable."""
    config = parse_config(yaml.safe_dump({"destinations": [template_dest(
        url="https://h.example.com/x?key=lit&id={{ event.id }}",
        headers={"Accept": "application/json", "X-Auth": "Token tok"})]}), env={})
    dest = config.destinations[0]
    assert set(destination_secrets(dest)) == {"lit", "Token tok", "tok"}
    shown = mask(Request("GET", "https://h.example.com/x?key=lit&id=evt-1",
                         {"Accept": "application/json", "X-Auth": "Token tok"}),
                 destination_secrets(dest))
    assert shown.url == "https://h.example.com/x?key=****&id=evt-1"
    assert shown.headers == {"Accept": "application/json", "X-Auth": "Token ****"}


@pytest.mark.parametrize(("name", "value", "secret"), [
    ("X-Env", "production", False), ("X-Request-Source", "relay", False),
    ("X-Design", "blue", False), ("format", "json", False), ("X-Custom", "Bearer abc", True),
    ("Authorization", "abc", True), ("X-Api-Key", "abc", True), ("X-Auth", "abc", True),
    ("X-Hub-Signature", "abc", True), ("Cookie", "abc", True), ("access_token", "abc", True),
    ("api_sig", "abc", True), ("code", "abc", True), ("X-Client-Secret", "abc", True),
    ("X-Pass", "abc", True), ("pwd", "abc", True), ("X-Jwt", "abc", True),
    ("Proxy-Authorization", "abc", True), ("X-Author", "relay", False),
    ("passenger", "abc", False)])
def test_a_configured_value_is_a_secret_when_its_name_or_scheme_word_says_so(
        name: str, value: str, secret: bool) -> None:
    """The rule for what is looked for in an echoing receiver's answer."""
    assert is_credential(name, value) is secret


def test_echoes_look_for_secrets_only() -> None:
    """A destination's echoes: credential header and query values (a rendered one read from
    each request), not the other configured values."""
    config = parse_config(yaml.safe_dump({"destinations": [template_dest(
        url="https://h.example.com/x?api_key=qs-secret&format=json",
        headers={"X-Env": "production", "X-Api-Key": "hdr-secret",
                 "X-User-Token": "{{ event.attributes.token }}"})]}), env={})
    echoes = Echoes.of(config.destinations[0])
    assert set(echoes.static) == {"qs-secret", "hdr-secret"} and echoes.signed == ("X-User-Token",)
    request = Request("POST", "https://h.example.com/x", {"X-User-Token": "per-event-token"})
    echoed = "production qs-secret hdr-secret per-event-token json"
    assert echoes.hide(echoed, request) == "production **** **** **** json"


def test_a_secret_cut_off_at_the_end_of_an_excerpt_is_hidden() -> None:
    """A 1 KiB excerpt that ends inside an echoed secret keeps none of its start (4
    characters or more); a short text ending like a secret's start is not an excerpt cut."""
    secrets = ("tok-12345678",)
    assert hide("x" * 1000 + '"Bearer tok-1234', secrets) == "x" * 1000 + '"Bearer ****'
    assert hide("x" * 1000 + '"Bearer tok', secrets) == "x" * 1000 + '"Bearer tok'
    assert hide("paid with tok-1", secrets) == "paid with tok-1"


def log_json(mask_filter: MaskSecrets, record: logging.LogRecord) -> dict[str, Any]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(mask_filter)
    handler.handle(record)
    result: dict[str, Any] = json.loads(stream.getvalue())
    return result


def test_log_masking_covers_extra_fields_and_tracebacks(tmp_path: Path) -> None:
    """A secret in an ``extra`` field (string, nested, number) and in a traceback is masked in
    the JSON line."""
    config = load_config(write_config(tmp_path, server={"token": "tok-in-extra-1"},
                                      destinations=[template_dest(
                                          headers={"X-Auth": str(NUMERIC)})]), env={})
    mask_filter = MaskSecrets(config_secrets(config))
    try:
        raise RuntimeError("connect failed with tok-in-extra-1")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.makeLogRecord({
        "msg": "attempt failed", "levelname": "WARNING", "exc_info": exc_info,
        "url": "https://h/x?t=tok-in-extra-1", "nested": {"a": ["tok-in-extra-1"]},
        "code": NUMERIC})
    line = log_json(mask_filter, record)
    text = json.dumps(line)
    assert "tok-in-extra-1" not in text and str(NUMERIC) not in text
    assert line["url"] == "https://h/x?t=****" and line["nested"] == {"a": ["****"]}
    assert line["code"] == "****"
    assert "RuntimeError: connect failed with ****" in line["exception"]


def test_short_secrets_are_masked_as_whole_tokens() -> None:
    """A secret of any length is masked; a short one only where it stands alone, so it does
    not shred the words it happens to be part of."""
    mask_filter = MaskSecrets(["ab1", "x"])
    line = log_json(mask_filter, logging.makeLogRecord(
        {"msg": "token=ab1 Bearer ab1 cab1e x-ray %s", "args": ("x",), "levelname": "INFO"}))
    assert line["message"] == "token=**** Bearer **** cab1e ****-ray ****"


def test_spool_files_are_private_once_serving(tmp_path: Path) -> None:
    """After `relay serve` starts and takes an event, every spool file is mode 0600."""
    proc = RelayProcess(write_config(tmp_path), tmp_path / "relay.log").start()
    try:
        assert http("POST", proc.url + "/v1/events", event(1))[0] == 202
        files = sorted(tmp_path.glob("spool.db*"))
        assert {f.name for f in files} >= {"spool.db", "spool.db-wal", "spool.db.lock"}
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        assert set(modes.values()) == {0o600}, modes
    finally:
        proc.stop()


def test_an_older_world_readable_spool_is_tightened(tmp_path: Path) -> None:
    """A spool file left 0644 by an older relay is made 0600 before it is opened."""
    from relay.spool.files import private_spool_files

    spool = tmp_path / "old.db"
    spool.write_bytes(b"")
    spool.chmod(0o644)
    private_spool_files(str(spool))
    assert stat.S_IMODE(spool.stat().st_mode) == 0o600


# -- B: closed by default -------------------------------------------------------------------


def test_serve_on_all_interfaces_without_protection_refuses(tmp_path: Path) -> None:
    """`relay serve` on 0.0.0.0 without token or allow_cidrs exits 1 naming the keys to set
    (and check-config says the same)."""
    path = write_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["server"]["listen"] = "0.0.0.0:0"
    path.write_text(yaml.safe_dump(config))
    for args in (("serve", "-c", str(path)), ("check-config", str(path))):
        out = relay(*args, cwd=tmp_path)
        assert out.returncode == 1
        for key in ("server.listen", "server.token", "server.allow_cidrs",
                    "server.allow_unauthenticated"):
            assert key in out.stderr, (args, out.stderr)


@pytest.mark.parametrize("server", [
    {"allow_unauthenticated": True}, {"token": "t0ken"}, {"allow_cidrs": ["10.0.0.0/8"]},
])
def test_open_listener_is_accepted_when_protected_or_meant(server: dict[str, Any]) -> None:
    """A non-loopback listener is accepted with a token, client networks, or an explicit
    allow_unauthenticated: true."""
    config = parse_config(yaml.safe_dump({"server": {"listen": "0.0.0.0:8080", **server}}),
                          env={})
    assert config.server.listen == "0.0.0.0:8080"


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "[::1]:8080", "localhost:8080"])
def test_loopback_listener_needs_no_token(listen: str) -> None:
    """Loopback (the sidecar default) stays open: only local processes can reach it."""
    assert parse_config(yaml.safe_dump({"server": {"listen": listen}}), env={}).server.token \
        is None


def test_server_token_file(tmp_path: Path) -> None:
    """server.token_file reads the token from a file (and protects an open listener)."""
    (tmp_path / "token").write_text("from-a-file\n")
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"server": {"listen": "0.0.0.0:8080",
                                               "token_file": "token"}}))
    config = load_config(path, env={})
    assert config.server.token is not None
    assert config.server.token.get_secret_value() == "from-a-file"
    assert "from-a-file" in config_secrets(config)


# -- C: check-config warns about JSON bodies without the json filter ------------------------


def test_check_config_warns_on_json_raw_body_without_json_filter(tmp_path: Path) -> None:
    """A raw body sent as JSON that prints a value without `| json` is a warning on stderr,
    naming the path; check-config still succeeds. `| json`, `| json_escape` and a non-JSON
    content type give no warning."""
    raw = '{"id": "{{ event.message_id }}", "n": {{ event.attributes | json }}}'
    dests = [
        template_dest(template={"body": {"type": "raw", "template": raw,
                                         "content_type": "application/json"}}),
        {**template_dest(template={"body": {"type": "raw", "template": raw}}), "name": "b",
         "headers": {"Content-Type": "application/vnd.api+json"}},
        {**template_dest(template={"body": {"type": "raw", "content_type": "application/json",
                                            "template": '{"id": {{ event.id | json }}, '
                                                        '"m": "{{ event.id | json_escape }}"}'}}),
         "name": "c"},
        {**template_dest(template={"body": {"type": "raw", "template": raw}}), "name": "d"},
    ]
    path = write_config(tmp_path, destinations=dests)
    out = relay("check-config", str(path), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
    assert [w.split(": ")[1] for w in warnings] == ["destinations[0].template.body.template",
                                                  "destinations[1].template.body.template"]
    assert "{{ event.message_id }}" in warnings[0] and "json filter" in warnings[0]


def test_check_config_warns_on_a_json_raw_body_that_renders_no_json(tmp_path: Path) -> None:
    """A raw body sent as JSON that renders to something else for a sample event (a missing
    comma) is a warning naming its path, in each variant's language too; check-config still
    succeeds. A body the json-filter warning names already gets no second one."""
    broken = '{"status": {{ event.status | json }} "id": {{ event.message_id | json }}}'
    body = {"type": "raw", "content_type": "application/json", "template": broken}
    dest = template_dest(template={
        "body": {**body, "template": '{"status": {{ event.status | json }}}'},
        "variants": {"fr": {"body": body},
                     "de": {"body": {**body, "template": '{"s": {{ event.status }}}'}}}})
    path = write_config(tmp_path, destinations=[dest])
    out = relay("check-config", str(path), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr
    warnings = sorted(line for line in out.stderr.splitlines() if line.startswith("warning: "))
    assert [w.split(": ")[1] for w in warnings] == [
        "destinations[0].template.variants.de.body.template",
        "destinations[0].template.variants.fr.body.template"]
    assert "json filter" in warnings[0]
    assert "renders to something else for a sample event (Expecting ',' delimiter" in \
        warnings[1] and "relay render shows it" in warnings[1]


def test_log_masking_leaves_plain_header_values_readable(tmp_path: Path) -> None:
    """Logs mask credentials, not every header value: with `X-Env: example` (the example
    config's), every "example" was ****, the destination name `ajo-example` in every line too.
    A credential header's value, a credential query value and the auth secret stay masked,
    however short (a short one as a whole token)."""
    config = load_config(write_config(tmp_path, destinations=[{
        **template_dest(headers={"X-Env": "example", "X-Author": "relay",
                                 "X-Api-Key": "key-9f8e7d6c", "X-Pass": "pv",
                                 "X-Team": "Token tok-5a4b3c2d"},
                        auth={"type": "bearer", "token": "abc"}),
        "name": "ajo-example",
        "url": "https://hooks.example.com/x?format=json&sig=sig-0d1e2f3a&pwd=p9"}]), env={})
    mask_filter = MaskSecrets(config_secrets(config))
    text = ("relay: delivery dlv_1 to ajo-example (format=json): 401 for key-9f8e7d6c, "
            "tok-5a4b3c2d, abc, pv, p9 and sig-0d1e2f3a")
    assert mask_filter.mask(text) == ("relay: delivery dlv_1 to ajo-example (format=json): 401 "
                                      "for ****, ****, ****, ****, **** and ****")


def test_a_templated_host_with_a_subscript_loads(tmp_path: Path) -> None:
    """A url host rendered with a subscript (`{{ event.attributes['region'] }}`) loads: the
    credentials of its query are read without parsing its host (urlsplit refuses brackets
    there, and every command that loaded such a config was a traceback)."""
    path = write_config(tmp_path, delivery={"allowed_networks": ["127.0.0.0/8"]},
                        destinations=[template_dest(
                            url="https://{{ event.attributes['region'] }}.api.example.com/h"
                                "?api_key=k-1a2b3c",
                            allowed_hosts=["eu.api.example.com"])])
    out = subprocess.run([sys.executable, "-m", "relay", "check-config", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("OK:"), out.stderr
    assert "k-1a2b3c" in config_secrets(load_config(path, env={}))
