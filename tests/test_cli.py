"""The command line and config errors as a newcomer meets them: one round of errors, misplaced
keys named, -c everywhere, replay reading only what it needs, a sink that fails on demand."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import load_config
from relay.destinations import load
from relay.errors import ConfigError
from relay.sink import Rules, SinkError, answer, parse_rules, sink_app
from tests.helpers import ROOT, RelayProcess, event, http, write_config


def relay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_every_problem_in_one_round(tmp_path: Path) -> None:
    """Structure errors, URL/port checks of the valid destinations and template compile errors
    all come in one ConfigError."""
    path = write_config(tmp_path, server={"timeout": "30s"}, destinations=[
        {"name": "good", "format": "braze", "url": "http://127.0.0.1:9000/x"},
        {"name": "bad", "format": "braze", "urll": "https://x"},
        {"name": "tpl", "format": "template", "url": "https://example.com/{{ event.id",
         "template": {"method": "POST"}}])
    with pytest.raises(ConfigError) as caught:
        load(path, env={})
    found = dict(caught.value.problems)
    assert found["server.timeout"] == \
        "unknown key; timeout belongs under delivery or a destination"
    assert "destinations[1].url" in found and "did you mean 'url'" in found["destinations[1].urll"]
    assert "port 9000 is not in delivery.allowed_ports" in found["destinations[0].url"]
    assert "Liquid syntax error" in found["destinations[2].url"]


def test_broken_delivery_section_does_not_invent_port_errors(tmp_path: Path) -> None:
    """A destination is not checked against defaults standing in for a broken section."""
    path = write_config(tmp_path, delivery={"allowed_ports": [9000], "concurrency": "many"},
                        destinations=[{"name": "a", "format": "braze",
                                       "url": "http://127.0.0.1:9000/x"}])
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert [p for p, _ in caught.value.problems] == ["delivery.concurrency"]


def test_schema_error_does_not_hide_url_checks(tmp_path: Path) -> None:
    """check-config names a broken delivery key and a destination's refused address and port
    in one run: the keys of delivery that validate still hold the destinations to them."""
    path = tmp_path / "relay.yaml"
    path.write_text("delivery:\n  timeout: 30\ndestinations:\n  - name: crm\n    format: braze\n"
                    "    url: http://10.1.2.3:8081\n")
    done = relay("check-config", str(path))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines()[1:] == [
        "  delivery.timeout: expected a duration such as '100ms', '90s', '30m', '24h' or '7d' "
        "(got 30; a bare number has no unit)",
        "  destinations[0].url: address 10.1.2.3, an internal address: refused (list its "
        "network in delivery.allowed_networks to allow it)",
        "  destinations[0].url: port 8081 is not in delivery.allowed_ports (80, 443)"]


def test_broken_allowed_ports_skips_port_checks_only(tmp_path: Path) -> None:
    """An allowed_ports that fails validation checks no port (its default, 80 and 443, would
    refuse 9000, which the file allows), in the config check and when a template compiles;
    the other checks of the url still run."""
    tpl = {"name": "t", "format": "template", "url": "https://crm.example.com:9000/x",
           "template": {"method": "POST", "variants": {"fr": {"url": "https://crm.example.com:9000/fr"}}}}
    path = write_config(tmp_path, delivery={"allowed_ports": [443, 9000, "x"]}, destinations=[
        tpl, {"name": "b", "format": "braze", "url": "https://u:p@b.example.com:9000/x"}])
    with pytest.raises(ConfigError) as caught:
        load(path, env={})
    assert caught.value.problems == [
        ("delivery.allowed_ports[2]", "expected a whole number (got 'x')"),
        ("destinations[1].url", "must not carry userinfo (user:password@); use auth")]


@pytest.mark.parametrize(("sections", "hidden"), [
    ({"server": {"listen": "0.0.0.0:0", "token": "${RELAY_TEST_UNSET}"}}, "server.listen"),
    ({"spool": {"backend": "postgres", "postgres": {"dsn": "postgresql://u@h/db", "lease": "60s"}},
      "delivery": {"timeout": 30}}, "spool.postgres.lease"),
    ({"delivery": {"backoff_max": "2h", "backoff_initial": "1h", "retry_window": 5},
      "destinations": [{"name": "b", "format": "braze", "url": "https://b.example.com/x",
                        "backoff_initial": "20m"}]}, "destinations[0].backoff_initial"),
])
def test_no_problem_derived_from_an_earlier_one(tmp_path: Path, sections: dict[str, Any],
                                                hidden: str) -> None:
    """A rule is not judged against a default standing in for a value that failed: an unset
    ${RELAY_TOKEN} is not "the API has no protection", a broken delivery.timeout not "the
    lease must outlast 90s"; a broken key does not hide its section's valid ones."""
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, **sections), env={})
    assert len(caught.value.problems) == 1 and hidden not in dict(caught.value.problems)


def test_typo_still_suggests_the_close_key(tmp_path: Path) -> None:
    """A key that exists nowhere gets the closest known key."""
    with pytest.raises(ConfigError, match=r"server.lisen: unknown key \(did you mean 'listen'\?\)"):
        load_config(write_config(tmp_path, server={"lisen": "x"}), env={})


def test_relative_spool_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """spool.path ./x.db in /some/dir/relay.yaml is /some/dir/x.db, whatever the cwd."""
    folder = tmp_path / "conf"
    folder.mkdir()
    path = write_config(folder, spool={"path": "./data/x.db"})
    assert load_config(path, env={}).spool.path == str(folder / "data" / "x.db")
    absolute = write_config(folder, spool={"path": str(tmp_path / "abs.db")})
    assert load_config(absolute, env={}).spool.path == str(tmp_path / "abs.db")


def test_check_config_takes_c_and_positional(tmp_path: Path) -> None:
    """check-config accepts -c FILE like every command, and FILE as before."""
    example = str(ROOT / "config.example.yaml")
    for args in (["-c", example], [example], ["--config", example]):
        done = relay("check-config", *args)
        assert done.returncode == 0 and done.stdout.startswith("OK"), done.stderr
    assert relay("check-config").returncode == 2


def test_check_config_counts_destinations_in_english(tmp_path: Path) -> None:
    """OK names the number of destinations: "1 destination", "3 destinations"."""
    one = tmp_path / "one"
    one.mkdir()
    path = write_config(one, destinations=[{"name": "b", "format": "braze",
                                            "url": "https://h.example.com/b"}])
    assert relay("check-config", str(path)).stdout == f"OK: {path} (1 destination)\n"
    path = write_config(tmp_path)
    assert relay("check-config", str(path)).stdout == f"OK: {path} (3 destinations)\n"


@pytest.mark.parametrize("text", ["destinations: []\n", "spool: {path: spool.db}\n", ""])
def test_check_config_refuses_no_destinations_as_serve_does(tmp_path: Path, text: str) -> None:
    """check-config ("as serve would") said OK to a file without destinations, which serve
    refuses to start with: both exit 1 with the same message now."""
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    check, serve = relay("check-config", str(path)), relay("serve", "-c", str(path))
    assert check.returncode == serve.returncode == 1
    assert check.stdout == "" and check.stderr == serve.stderr.replace(
        "relay serve: ", "relay check-config: ", 1)
    assert check.stderr.startswith(f"relay check-config: {path} has no destinations, so "
                                   "nothing would be delivered."), check.stderr


@pytest.mark.parametrize("command", ["serve", "check-config", "config-reference", "render",
                                     "test", "replay", "healthcheck", "sink"])
def test_every_subcommand_has_a_description_and_option_help(command: str) -> None:
    """`relay COMMAND --help` has a description, -c/--config, and help on every option."""
    from relay.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command").choices[command]  # type: ignore[attr-defined]
    assert sub.description
    assert any("--config" in a.option_strings for a in sub._actions)
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize(("args", "listen"), [
    (["--port", "8081"], "127.0.0.1:8081"), (["--port=8081"], "127.0.0.1:8081"),
    (["--listen", "0.0.0.0:9000"], "0.0.0.0:9000"), (["--host", "0.0.0.0"], "0.0.0.0:8080")])
def test_serve_address_options_say_the_address_is_in_the_config(args: list[str],
                                                                listen: str) -> None:
    """`relay serve -c FILE --port 8081` (or --listen, --host) is a usage error of serve saying
    that the address is server.listen (it was the top-level usage and "unrecognized
    arguments")."""
    done = relay("serve", "-c", "config.example.yaml", *args)
    assert done.returncode == 2 and done.stdout == ""
    usage, said = done.stderr.splitlines()
    assert usage == "usage: relay serve [-h] -c FILE"
    option = args[0].split("=")[0]
    assert said == (
        f"relay serve: error: {option}: serve takes its address from server.listen in the "
        f'config (-c config.example.yaml): set it there (server: {{listen: "{listen}"}}), or '
        'choose it per run with listen: "${RELAY_LISTEN:-127.0.0.1:8080}" there and '
        f"RELAY_LISTEN={listen} relay serve -c config.example.yaml")


def test_replay_reads_only_listen_and_token(tmp_path: Path) -> None:
    """replay needs no destination secret to be set, and an unknown id exits 1 saying so."""
    config = write_config(tmp_path, server={"token": "tok-12345678"})
    text = yaml.safe_load(config.read_text())
    text["destinations"][0]["auth"] = {"type": "bearer", "token": "${NOT_SET_ANYWHERE}"}
    running = write_config(tmp_path)  # the relay itself runs without that destination
    proc = RelayProcess(running, tmp_path / "relay.log").start()
    try:
        port = proc.url.rsplit(":", 1)[1]
        text["server"]["listen"] = f"127.0.0.1:{port}"
        text["server"]["token"] = None
        replay_config = tmp_path / "replay.yaml"
        replay_config.write_text(yaml.safe_dump(text))
        status, _, _ = http("POST", proc.url + "/v1/events", event(1))
        assert status == 202
        done = relay("replay", "-c", str(replay_config), "--id", "dlv_unknown")
        assert done.returncode == 1, done.stderr
        assert "replayed 0 deliveries" in done.stdout
        assert "delivery 'dlv_unknown' is not known" in done.stderr
        assert "NOT_SET_ANYWHERE" not in done.stderr
        done = relay("replay", "-c", str(replay_config), "--all")
        assert done.returncode == 0 and "replayed 0 deliveries" in done.stdout
    finally:
        proc.stop()


def test_replay_of_an_unknown_destination_fails_naming_the_configured_ones(tmp_path: Path
                                                                          ) -> None:
    """`relay replay --destination nope` exits 1 with the relay's list of destinations (it
    printed "replayed 0 deliveries" and exited 0)."""
    proc = RelayProcess(write_config(tmp_path), tmp_path / "relay.log").start()
    try:
        (tmp_path / "cli").mkdir()
        config = write_config(tmp_path / "cli", server={"listen": proc.url.split("//")[1]})
        done = relay("replay", "-c", str(config), "--destination", "nope")
        assert done.returncode == 1 and done.stdout == "", done.stdout
        assert done.stderr == "relay replay: 400: no destination 'nope' (destinations: ajo, " \
                              "braze, crm)\n", done.stderr
        done = relay("replay", "-c", str(config), "--destination", "crm")
        assert done.returncode == 0 and done.stdout == "replayed 0 deliveries\n", done.stderr
    finally:
        proc.stop()


def test_replay_refused_for_its_token_says_where_the_token_comes_from(tmp_path: Path) -> None:
    """A 401 to `relay replay` says which Authorization problem it was and that replay reads
    server.token from its -c file with this command's environment (RELAY_TOKEN set for the
    relay only gave a bare "401: missing or wrong Authorization: Bearer token")."""
    token = {"token": "${RELAY_TOKEN:-}"}
    proc = RelayProcess(write_config(tmp_path, server=token), tmp_path / "relay.log",
                        env={"RELAY_TOKEN": "the-relays-token-123"}).start()
    try:
        (tmp_path / "cli").mkdir()
        config = write_config(tmp_path / "cli",
                              server={**token, "listen": proc.url.split("//")[1]})
        env = {k: v for k, v in os.environ.items() if k != "RELAY_TOKEN"}
        done = relay("replay", "-c", str(config), "--all", env=env)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.splitlines() == [
            "relay replay: 401: no Authorization header: send Authorization: Bearer "
            "<server.token>",
            f"relay replay: it sent no token: it takes server.token from -c {config}, which "
            "reads RELAY_TOKEN from this command's environment (unset or empty here). Set "
            "RELAY_TOKEN here too, as the relay was started with: RELAY_TOKEN=... relay replay "
            f"-c {config} ..."], done.stderr
        done = relay("replay", "-c", str(config), "--all",
                     env={**env, "RELAY_TOKEN": "another-token-4567"})
        assert done.returncode == 1 and done.stderr.splitlines()[0] == \
            "relay replay: 401: wrong Bearer token: it is not the relay's server.token"
        assert "it sent a token the relay refused: it takes server.token from" in done.stderr
        assert "another-token" not in done.stderr and "the-relays-token" not in done.stderr
        done = relay("replay", "-c", str(config), "--all",
                     env={**env, "RELAY_TOKEN": "the-relays-token-123"})
        assert done.returncode == 0 and done.stdout == "replayed 0 deliveries\n", done.stderr
    finally:
        proc.stop()


@pytest.mark.parametrize(("server", "hint"), [
    ({"token": "written-out-token-1"}, "it sent a token the relay refused: it takes the token "
     "from server.token in -c {file}; the relay was started with another token (or another "
     "config file?)"),
    ({"token_file": "token.txt"}, "it sent a token the relay refused: it takes the token from "
     "server.token_file in -c {file}; the relay was started with another token (or another "
     "config file?)"),
    ({}, "it sent no token: -c {file} sets no server.token, but the relay was started with one "
     "(another config file, or its token from an environment variable?)"),
    ({"token": "${A:-fallback-token-9}${B:-}"}, "it sent a token the relay refused: it takes "
     "server.token from -c {file}, which reads A and B from this command's environment. Set A "
     "and B here too, as the relay was started with: A=... relay replay -c {file} ..."),
])
def test_replay_token_hints(tmp_path: Path, server: dict[str, str], hint: str) -> None:
    """Replay's hint after a 401 names where its token came from, never the token (nor a
    ${VAR:-fallback}'s fallback)."""
    from relay.cli import _token_hint
    from relay.config.load import read_access

    (tmp_path / "token.txt").write_text("token-from-a-file-1\n")
    config = write_config(tmp_path, server=server)
    said = _token_hint(str(config), read_access(config, env={}))
    assert said == hint.format(file=config)
    assert "-token-" not in said


def test_serve_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    """A relay whose port is taken exits 1 with one line naming the port and what to do."""
    first = RelayProcess(write_config(tmp_path), tmp_path / "a.log").start()
    try:
        port = first.url.rsplit(":", 1)[1]
        other = tmp_path / "other"
        other.mkdir()
        done = relay("serve", "-c", str(write_config(other, server={"listen": f"127.0.0.1:{port}"})))
        assert done.returncode == 1
        line = done.stderr.strip().splitlines()[-1]
        assert f"port {port} is already in use" in line and "server.listen" in line
        assert "Traceback" not in done.stderr
    finally:
        first.stop()


@pytest.mark.parametrize(("rules", "path", "draw", "expected"), [
    (Rules(), "/x", 0.0, (200, 0.0)),
    (Rules(status={"": 503}), "/x", 0.9, (503, 0.0)),
    (Rules(status={"": 200, "/braze": 503}), "/braze/1", 0.9, (503, 0.0)),
    (Rules(status={"/braze": 503}), "/ajo", 0.9, (200, 0.0)),
    (Rules(fail_rate={"": 0.5}), "/x", 0.49, (503, 0.0)),
    (Rules(fail_rate={"": 0.5}), "/x", 0.5, (200, 0.0)),
    (Rules(delay={"/crm": 2.0}), "/crm/a", 0.0, (200, 2.0)),
])
def test_sink_answers(rules: Rules, path: str, draw: float, expected: tuple[int, float]) -> None:
    """The sink's answer: per-path status (longest prefix wins), fail rate, delay."""
    assert answer(rules, path, draw) == expected


def test_sink_options_parse_and_refuse_nonsense() -> None:
    """--status, --fail-rate, --delay take VALUE or /PATH=VALUE; wrong values name the option."""
    rules = parse_rules(["503", "/braze=400"], ["0.5"], ["/crm=2s"])
    assert rules == Rules({"": 503, "/braze": 400}, {"": 0.5}, {"/crm": 2.0})
    for bad in (["abc"], ["braze=503"], ["/x=700"]):
        with pytest.raises(SinkError, match="--status"):
            parse_rules(bad, [], [])
    with pytest.raises(SinkError, match="--fail-rate"):
        parse_rules([], ["2"], [])


async def test_sink_answers_404_to_a_path_no_destination_posts_to(tmp_path: Path,
                                                                   aiohttp_client: Any) -> None:
    """Given the config, the sink answers 404 saying why to a path no destination posts to,
    and names the relay's address for the relay's own paths (it said 200 {"received": true}
    to an event posted to its port instead of the relay's); without a config, any path."""
    path = write_config(tmp_path, server={"listen": "0.0.0.0:8089", "token": "t0k-123456789"})
    out = io.StringIO()
    client = await aiohttp_client(sink_app(load_config(path, env={}), out=out,
                                           rules=parse_rules(["503", "/test=202"], [], [])))
    resp = await client.post("/v1/events", json=event(1))
    assert resp.status == 404
    assert await resp.json() == {"received": False, "error": (
        "this is relay sink, the test receiver, not the relay: the relay listens on "
        f"server.listen (0.0.0.0:8089 in {path}), so send this to "
        "http://127.0.0.1:8089/v1/events")}
    resp = await client.get("/elsewhere")
    assert resp.status == 404
    assert (await resp.json())["error"] == (
        f"no destination of {path} posts to /elsewhere: relay sink, the test receiver, takes "
        "only its destinations' url paths (/ajo, /braze, /crm)")
    assert "=> answered 404: no destination of" in out.getvalue()
    assert (await client.post("/braze", json={})).status == 503    # the rules, as before
    assert (await client.post("/crm/x", json={})).status == 503
    assert (await client.post("/test/1", json={})).status == 202   # a path a rule names
    anything = await aiohttp_client(sink_app(None, out=out))
    resp = await anything.post("/v1/events", json=event(1))
    assert resp.status == 200 and (await resp.json())["received"] is True


async def test_sink_takes_a_variant_url_and_an_encoded_path(tmp_path: Path,
                                                            aiohttp_client: Any) -> None:
    """A template variant's own url path and a percent-encoded one are a destination's paths
    too (the sink answered them 404, which the relay takes as a permanent failure)."""
    crm = {"name": "crm", "format": "template", "url": "http://127.0.0.1:9/crm/{{ event.id }}",
           "allowed_ports": [9],
           "template": {"method": "POST", "body": {"type": "json", "fields": {"s": "x"}},
                        "variants": {"fr": {"url": "http://127.0.0.1:9/crm-fr/{{ event.id }}"}}}}
    path = write_config(tmp_path, destinations=[
        crm, {"name": "b", "format": "braze", "url": "http://127.0.0.1:9/my%20hook"}])
    out = io.StringIO()
    client = await aiohttp_client(sink_app(load_config(path, env={}), out=out))
    assert (await client.post("/crm-fr/evt-1", json={})).status == 200
    assert (await client.post("/my%20hook", json={})).status == 200
    assert "=> destination crm:" in out.getvalue() and "=> destination b:" in out.getvalue()
    assert (await client.post("/other", json={})).status == 404


def test_output_cut_short_by_its_reader_is_no_traceback(tmp_path: Path) -> None:
    """`relay render ... | head -1`: the reader closes the pipe; the relay says nothing more
    (it printed a BrokenPipeError traceback, twice)."""
    (tmp_path / "relay.yaml").write_text(
        'destinations: [{name: b, format: braze, url: "https://h.example.com/b"}]\n')
    (tmp_path / "event.json").write_text(
        '{"channel": "email", "status": "delivered", "message_id": "m"}')
    read, write = os.pipe()
    os.close(read)   # nobody reads: the first write fails with EPIPE
    proc = subprocess.run([sys.executable, "-m", "relay", "render", "-c",
                           str(tmp_path / "relay.yaml"), "-d", "b", str(tmp_path / "event.json")],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert "Traceback" not in proc.stderr and proc.returncode == 1, proc.stderr
