"""Configuration: defaults, durations, interpolation, secrets from files, and errors naming paths."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Config, load_config, parse_config, parse_duration, validate_config
from relay.config.fields import MAX_DESTINATIONS
from relay.destinations import load as load_destinations
from relay.errors import ConfigError
from relay.events import load_event
from relay.payloads import build_renderer
from tests.helpers import ROOT


def problems(text: str, env: dict[str, str] | None = None, base: Path | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), env=env or {}, base_dir=base)
    return dict(info.value.problems)


@pytest.mark.parametrize(("text", "seconds"), [
    ("100ms", 0.1), ("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800),
    ("1h30m", 5400), ("1.5s", 1.5), (" 2s ", 2),
])
def test_durations_parse_to_seconds(text: str, seconds: float) -> None:
    """Every documented duration unit converts to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", [30, "30", "30 s", "s", "", "1y", True, None, "-5s"])
def test_bad_durations_are_rejected(bad: object) -> None:
    """A duration without a unit, or with an unknown one, is an error, not a guess."""
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)


def test_empty_config_gets_spec_defaults() -> None:
    """An empty file is valid and every default matches SPEC.md."""
    config = parse_config("", env={})
    assert config.server.listen == "127.0.0.1:8080"
    assert config.server.max_body_bytes == 1048576 and config.server.max_batch == 500
    assert config.server.drain_timeout == 20
    assert (config.spool.path, config.spool.max_events, config.spool.retention) == \
        ("./relay-spool.db", 1_000_000, 7 * 86400)
    d = config.delivery
    assert (d.timeout, d.max_retries, d.retry_window, d.unreachable_window) == (90, 5, 1800, 86400)
    assert (d.backoff_initial, d.backoff_max, d.allowed_ports) == (30, 600, (80, 443))
    assert (d.concurrency, d.per_host_concurrency) == (64, 16)
    h = config.health
    assert (h.window, h.min_failures, h.failure_rate, h.consecutive_failures) == (60, 20, 0.9, 10)
    assert (h.suspend_for, h.suspend_max) == (60, 1800)
    assert config.destinations == ()


def test_example_config_is_valid() -> None:
    """config.example.yaml loads with no environment set and has one destination per format."""
    config = load_config(ROOT / "config.example.yaml", env={})
    assert sorted(d.format for d in config.destinations) == ["ajo", "braze", "template"]


def test_env_interpolation_and_fallbacks() -> None:
    """${NAME} reads the environment, ${NAME:-x} falls back, $$ is a literal dollar."""
    config = parse_config("""
        server: {token: "${TOK}", listen: "127.0.0.1:${PORT:-9999}"}
        destinations:
          - {name: b, format: braze, url: "https://h/p?$$x", headers: {X-A: "${A:-dflt}"}}
    """, env={"TOK": "s3cret"})
    assert config.server.token is not None and config.server.token.get_secret_value() == "s3cret"
    assert config.server.listen == "127.0.0.1:9999"
    assert config.destinations[0].url == "https://h/p?$x"
    assert config.destinations[0].headers == {"X-A": "dflt"}


def test_missing_env_var_names_the_path() -> None:
    """An unset variable without a fallback is an error at the key that used it."""
    found = problems("""
        destinations:
          - {name: b, format: braze, url: "https://h/", auth: {type: bearer, token: "${NOPE}"}}
    """)
    assert "NOPE is not set" in found["destinations[0].auth.token"]


def test_unset_required_variable_says_set_it_and_names_the_file_key() -> None:
    """An unset ${VAR} in a key that needs a value is told to be set (and its *_file form
    named), not to be written ${VAR:-}, which fails as empty next."""
    text = """
        spool: {backend: postgres, postgres: {dsn: "${RELAY_POSTGRES_DSN}"}}
        destinations:
          - {name: b, format: braze, url: "https://h/", auth: {type: hmac, secret: "${HS}"}}
          - {name: c, format: template, url: "https://${CRM_HOST}/x", template: {method: POST}}
    """
    found = problems(text)
    assert found == {
        "spool.postgres.dsn": "environment variable RELAY_POSTGRES_DSN is not set, and dsn "
                              "cannot do without it: set it (or put the value in a file and "
                              "name it in dsn_file)",
        "destinations[0].auth.secret": "environment variable HS is not set, and secret cannot "
                                       "do without it: set it (or put the value in a file and "
                                       "name it in secret_file)",
        "destinations[1].url": "environment variable CRM_HOST is not set, and url cannot do "
                               "without it: set it"}
    # (and the fallback the old message offered is refused as missing, not accepted)
    assert problems(text.replace("_DSN}", "_DSN:-}"), env={"HS": "whsec_" + "A" * 32,
                                                           "CRM_HOST": "h"}) == {
        "spool.postgres.dsn": "required for spool.backend postgres (or dsn_file)"}


def test_unset_optional_variable_offers_the_fallback() -> None:
    """Where the value the reference leaves empty is accepted, ${VAR:-} is offered beside
    setting it (and token_file for server.token); a header in a free-form map has no *_file."""
    found = problems("""
        server: {token: "${RELAY_TOKEN}"}
        destinations:
          - {name: b, format: braze, url: "https://h/", headers: {token: "x${T}"}}
    """)
    assert found == {
        "server.token": "environment variable RELAY_TOKEN is not set: set it (or put the value "
                        "in a file and name it in token_file), or write ${RELAY_TOKEN:-} to "
                        "accept it unset (read as empty)",
        "destinations[0].headers.token": "environment variable T is not set: set it, or write "
                                         "${T:-} to accept it unset (read as empty)"}


def test_unset_token_of_an_open_listener_is_not_offered_the_fallback() -> None:
    """On a listener other machines reach, an empty token is refused by a rule that skips
    the unset key (no problem is built on a value the file does not hold): ${RELAY_TOKEN:-}
    is not offered there, as following it led straight to "the API has no protection"."""
    found = problems("""
        server: {listen: "0.0.0.0:8080", token: "${RELAY_TOKEN}"}
        destinations: [{name: b, format: braze, url: "https://h/"}]
    """)
    assert found == {"server.token": "environment variable RELAY_TOKEN is not set, and token "
                                     "cannot do without it: set it (or put the value in a "
                                     "file and name it in token_file)"}


def test_empty_token_means_no_token() -> None:
    """token: "${RELAY_TOKEN:-}" with the variable unset leaves ingest open, not guarded by ''."""
    assert parse_config('server: {token: "${RELAY_TOKEN:-}"}', env={}).server.token is None


def test_secrets_from_files_and_masked_repr(tmp_path: Path) -> None:
    """*_file keys read the secret (trailing newline stripped); repr never shows it."""
    (tmp_path / "tok").write_text("file-token\n")
    config = parse_config("""
        destinations:
          - {name: b, format: braze, url: "https://h/", auth: {type: bearer, token_file: tok}}
    """, env={}, base_dir=tmp_path)
    auth = config.destinations[0].auth
    assert auth.token.get_secret_value() == "file-token"  # type: ignore[union-attr]
    assert "file-token" not in repr(config)


def test_secret_file_errors(tmp_path: Path) -> None:
    """A missing secret file, or both key and key_file, are errors naming the key."""
    found = problems("""
        destinations:
          - {name: a, format: braze, url: "https://h/", auth: {type: bearer, token_file: /no/such}}
          - {name: b, format: braze, url: "https://h/",
             auth: {type: bearer, token: x, token_file: /no/such}}
    """, base=tmp_path)
    assert "cannot read secret file" in found["destinations[0].auth.token_file"]
    assert "not both" in found["destinations[1].auth.token_file"]
    assert "destinations[0].auth.token" not in found  # no second, misleading "missing"


def test_a_secret_file_must_be_a_small_regular_file(tmp_path: Path) -> None:
    """A FIFO blocked the read for good (check-config hung; a reload hung holding its lock),
    /dev/zero was read until memory ran out, a NUL in the path was a traceback. Each is now a
    problem at its key, found without waiting."""
    import os
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "huge").write_bytes(b"x" * (2 << 20))
    found = problems(f"""
        server: {{token_file: fifo}}
        destinations:
          - {{name: a, format: braze, url: "https://h/", auth: {{type: bearer, token_file: /dev/zero}}}}
          - {{name: b, format: braze, url: "https://h/", auth: {{type: bearer, token_file: huge}}}}
          - {{name: c, format: braze, url: "https://h/", auth: {{type: bearer, token_file: "a\\0b"}}}}
          - {{name: d, format: braze, url: "https://h/", auth: {{type: bearer, token_file: {tmp_path}}}}}
    """, base=tmp_path)
    assert "is not a regular file" in found["server.token_file"]
    assert "is not a regular file" in found["destinations[0].auth.token_file"]
    assert "larger than 1,048,576 bytes" in found["destinations[1].auth.token_file"]
    assert "NUL" in found["destinations[2].auth.token_file"]
    assert "is not a regular file" in found["destinations[3].auth.token_file"]


@pytest.mark.parametrize("value", ["2024-13-45", "1" * 5000])
def test_a_yaml_value_its_constructor_refuses_is_a_problem(tmp_path: Path, value: str) -> None:
    """PyYAML raises a bare ValueError for these: a traceback in check-config, and the reload
    watcher (which parses as loading does) was restarted on every poll (helper-39's review)."""
    from relay.reload import watched

    assert "a value YAML cannot read" in problems(f"x: {value}\n")[""]
    (tmp_path / "relay.yaml").write_text(f"x: {value}\n")
    assert len(watched(str(tmp_path / "relay.yaml"))) == 1   # the file itself, no traceback


def test_yaml_nested_too_deeply_is_a_problem_not_a_traceback() -> None:
    """PyYAML builds nested collections recursively: 300 levels were a RecursionError."""
    found = problems("server: " + "[" * 300 + "]" * 300)
    assert "nested too deeply" in found[""]


def test_unknown_keys_wrong_types_and_missing_keys_name_paths() -> None:
    """Typos, wrong types and missing keys are each reported at their exact path."""
    found = problems("""
        server: {tokn: x, max_batch: three}
        delivery: {timeout: 30, max_retrys: 2}
        destinations:
          - {name: a, format: ajo, url: "https://h/", auth: {type: jwt}}
          - {name: b, format: fax, url: "https://h/"}
        extra_section: {}
    """)
    assert found["server.tokn"] == "unknown key (did you mean 'token'?)"
    assert found["server.max_batch"] == "expected a whole number (got 'three')"
    assert "bare number has no unit" in found["delivery.timeout"]
    assert "did you mean 'max_retries'" in found["delivery.max_retrys"]
    assert found["destinations[0].auth.key"] == "required key is missing"
    assert "must be one of 'ajo', 'braze' or 'template'" in found["destinations[1].format"]
    assert found["extra_section"].startswith("unknown key")


def test_two_swapped_letters_suggest_the_key() -> None:
    """difflib rates a short key too far from its own: spool.postgres.dns had no hint."""
    found = problems("""
        spool: {backend: postgres, postgres: {dns: "postgresql://relay@db/relay"}}
        server: {lsiten: "127.0.0.1:8080"}
    """)
    assert found["spool.postgres.dns"] == "unknown key (did you mean 'dsn'?)"
    assert found["server.lsiten"] == "unknown key (did you mean 'listen'?)"


def test_yaml_syntax_error_names_the_line() -> None:
    """A YAML syntax error says on which line."""
    found = problems("server:\n  listen: [1\ndelivery: {}\n")
    assert "line 3" in found[""]


def test_duplicate_yaml_keys_are_errors() -> None:
    """Two identical keys in one mapping are an error, not 'the last one wins'."""
    found = problems("server:\n  listen: a:1\n  listen: b:2\n")
    assert "duplicate key 'listen'" in found[""]
    assert "line 3" in found[""]


def test_destination_cross_checks() -> None:
    """Unique names, one ajo per org+sandbox, https for ajo, allowed ports, allowed hosts."""
    found = problems("""
        destinations:
          - name: a
            format: ajo
            url: http://h.example.com/
            ajo: {ims_org: o, sandbox: {id: s1, name: prod}}
          - name: a
            format: ajo
            url: https://h.example.com:8443/
            ajo: {ims_org: o, sandbox: {id: s1, name: prod}}
          - name: t
            format: template
            url: "https://{{ event.attributes.host }}/x"
            template: {method: GET}
          - name: u
            format: template
            url: "https://other.example.com/x"
            allowed_hosts: [crm.example.com]
            template: {method: GET}
          - name: v
            format: braze
            url: "ftp://h/"
    """)
    assert "need https://" in found["destinations[0].url"]
    assert "duplicate destination name 'a'" in found["destinations[1].name"]
    assert "only one ajo destination per (ims_org, sandbox)" in found["destinations[1].ajo"]
    assert "port 8443 is not in delivery.allowed_ports (80, 443)" in found["destinations[1].url"]
    assert "required when the url's host is a template" in found["destinations[2].allowed_hosts"]
    assert "not in allowed_hosts" in found["destinations[3].url"]
    assert "https:// or http://" in found["destinations[4].url"]


def test_format_specific_sections() -> None:
    """ajo needs its ajo section, template its template; statuses must be expressible."""
    found = problems("""
        destinations:
          - {name: a, format: ajo, url: "https://h/", statuses: [processed]}
          - {name: t, format: template, url: "https://h/"}
          - {name: b, format: braze, url: "https://h/", statuses: [delayed],
             ajo: {ims_org: o, sandbox: {id: s, name: n}}}
          - {name: h, format: braze, url: "https://h/", auth: {type: hmac, secret: plain}}
    """)
    assert "required for format ajo" in found["destinations[0].ajo"]
    assert "cannot express status 'processed'" in found["destinations[0].statuses[0]"]
    assert "required for format template" in found["destinations[1].template"]
    assert "cannot express status 'delayed'" in found["destinations[2].statuses[0]"]
    assert "only used by format ajo" in found["destinations[2].ajo"]
    assert "whsec_" in found["destinations[3].auth.secret"]


def test_a_misplaced_secret_file_is_named_as_written(tmp_path: Path) -> None:
    """A *_file key is read into its key before validation: secret_file under bearer auth was
    "auth.secret: unknown key; secret belongs under a destination's auth" (it was under one),
    and token_file under type none was reported as auth.token."""
    (tmp_path / "s").write_text("a-secret-value")
    found = problems("""
        destinations:
          - {name: a, format: braze, url: "https://h/", auth: {type: bearer, secret_file: s}}
          - {name: b, format: braze, url: "https://h/", auth: {type: none, token_file: s}}
    """, base=tmp_path)
    assert "secret_file is not a key" in found["destinations[0].auth.secret_file"]
    assert "token_file is not a key" in found["destinations[1].auth.token_file"]
    assert "destinations[0].auth.secret" not in found and "destinations[1].auth.token" not in found


def test_a_rotation_secret_is_named_at_its_own_index(tmp_path: Path) -> None:
    """A bad secrets[1] was reported at auth.secret, a key the file did not have."""
    text = """
        destinations:
          - {name: h, format: braze, url: "https://h/", auth: {type: hmac, secrets: [
              "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "%s"]}}
    """
    assert list(problems(text % "plain")) == ["destinations[0].auth.secrets[1]"]
    (tmp_path / "relay.yaml").write_text(textwrap.dedent(text % "whsec_!!notb64"))
    with pytest.raises(ConfigError) as info:
        load_destinations(tmp_path / "relay.yaml", env={})
    assert [path for path, _ in info.value.problems] == ["destinations[0].auth.secrets[1]"]


def test_auth_type_errors_name_the_type_key() -> None:
    """An unknown or missing auth.type is reported at auth.type with the allowed values."""
    found = problems("""
        destinations:
          - {name: a, format: braze, url: "https://h/", auth: {type: oauth}}
          - {name: b, format: braze, url: "https://h/", auth: {token: x}}
    """)
    assert "'none', 'bearer', 'basic', 'jwt', 'hmac'" in found["destinations[0].auth.type"]
    assert found["destinations[1].auth.type"] == "required key is missing"


def test_config_objects_are_frozen() -> None:
    """Loaded config cannot be changed by accident at run time."""
    config = parse_config("", env={})
    with pytest.raises(Exception, match="frozen"):
        config.server.max_batch = 1  # type: ignore[misc]


def test_check_config_cli(tmp_path: Path) -> None:
    """`relay check-config` prints OK and exits 0, or prints the paths and exits 1."""
    ok = subprocess.run([sys.executable, "-m", "relay", "check-config",
                         str(ROOT / "config.example.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {listen: nowhere}\nspool: {max_events: 0}\n")
    out = subprocess.run([sys.executable, "-m", "relay", "check-config", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "server.listen: expected host:port" in out.stderr
    assert "spool.max_events:" in out.stderr
    missing = subprocess.run([sys.executable, "-m", "relay", "check-config", str(tmp_path / "no")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "cannot read config file" in missing.stderr


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 100_000), st.floats(-1, 1e6),
                         st.text(max_size=20), st.sampled_from(["90s", "100ms", "x", "https://h/",
                                                               "ajo", "braze", "template", "jwt"]))
keys = st.sampled_from(["server", "spool", "delivery", "health", "destinations", "name", "format",
                        "url", "auth", "type", "listen", "timeout", "path", "ajo", "template",
                        "body", "fields", "statuses", "channels", "max_batch", "bogus"])
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, yaml_values, max_size=6))
def test_arbitrary_config_data_is_a_config_or_a_config_error(data: dict) -> None:
    """Whatever the YAML holds, loading yields a Config or a ConfigError naming paths; no crash."""
    try:
        result = validate_config(data, env={})
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and m for p, m in exc.problems)
    else:
        assert isinstance(result, Config)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text_never_crashes(text: str) -> None:
    """Any text at all parses to a Config or raises ConfigError."""
    with contextlib.suppress(ConfigError):
        parse_config(text, env={})


def test_yaml_dump_of_defaults_round_trips(tmp_path: Path) -> None:
    """A config written by a tool (yaml.safe_dump) loads back the same."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"delivery": {"timeout": "5s", "allowed_ports": [80, 8080]}}))
    config = load_config(path, env={})
    assert config.delivery.timeout == 5 and config.delivery.allowed_ports == (80, 8080)


def test_ca_file_must_load(tmp_path: Path) -> None:
    """delivery.ca_file that is missing or not PEM is a config error, not a crash at start."""
    (tmp_path / "bad.pem").write_text("not a certificate")
    for path in (tmp_path / "missing.pem", tmp_path / "bad.pem"):
        found = problems(f"delivery: {{ca_file: {path}}}")
        assert "cannot load CA bundle" in found["delivery.ca_file"]


def test_more_destinations_than_delivery_ids_tell_apart_is_a_config_error() -> None:
    """An event's delivery ids tell at most 65,536 deliveries apart: a config with more
    destinations is refused when loaded, naming the path (an event routed to all of them
    was a 503 at ingest)."""
    entry = {"format": "braze", "url": "https://example.com/x"}
    many = [{"name": f"d{i}", **entry} for i in range(MAX_DESTINATIONS + 1)]
    with pytest.raises(ConfigError) as refused:
        validate_config({"destinations": many})
    assert refused.value.problems == [
        ("destinations", f"holds at most {MAX_DESTINATIONS:,} items (got {MAX_DESTINATIONS + 1})")]
    assert len(validate_config({"destinations": many[:MAX_DESTINATIONS]}).destinations) == \
        MAX_DESTINATIONS


def test_an_empty_secret_file_is_an_error_naming_the_key(tmp_path: Path) -> None:
    """An empty secret file (a Secret mounted wrong, a swap half done) is an error, not an
    empty secret: an emptied server.token_file turned the API's authentication off, at start
    and on a reload, with an info line saying nothing changed."""
    (tmp_path / "empty").write_text("\n\n")
    found = problems("""
        server: {token_file: empty}
        destinations:
          - {name: a, format: braze, url: "https://h/", auth: {type: bearer, token_file: empty}}
    """, base=tmp_path)
    assert "is empty" in found["server.token_file"], found
    assert "is empty" in found["destinations[0].auth.token_file"], found


def test_spool_path_is_never_empty_and_defaults_beside_the_config(tmp_path: Path) -> None:
    """An empty spool.path opened SQLite's temporary database (202s for events kept nowhere)
    and chmodded the working directory; it is an error. Without a spool section the default
    file is beside the config file, as a relative spool.path is, not in the directory the
    relay was started from."""
    assert "spool.path" in problems("""
        spool: {path: ""}
        destinations: [{name: a, format: braze, url: "https://h/"}]
    """)
    (tmp_path / "relay.yaml").write_text(
        "destinations: [{name: a, format: braze, url: 'https://h/'}]")
    config = load_config(tmp_path / "relay.yaml", env={})
    assert config.spool.path == str(tmp_path / "relay-spool.db")


def test_yaml_and_url_shapes_python_cannot_take_are_config_errors() -> None:
    """A list or mapping as a YAML key, and a URL urllib cannot split (an unclosed IPv6
    bracket), were Python tracebacks from every command; they are errors naming where."""
    with pytest.raises(ConfigError) as info:
        parse_config("{[1, 2]: x}", env={})
    assert "key" in str(info.value)
    found = problems("""
        destinations: [{name: a, format: braze, url: "https://[::1/x"}]
    """)
    assert "not a valid URL" in found["destinations[0].url"], found


def test_a_spool_path_that_is_a_directory_is_left_as_it_was(tmp_path: Path) -> None:
    """The relay tightens its spool files to 0600; a spool.path naming a directory (/tmp, a
    volume's mount point) had that directory chmodded to 0700 before the spool said it could
    not open it."""
    from relay.spool.files import private_spool_files

    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)
    private_spool_files(str(folder))
    assert folder.stat().st_mode & 0o7777 == 0o1777


def test_a_duration_past_ten_years_is_an_error() -> None:
    """A retry window or backoff of 10^20 days passed, then every delivery it touched made
    GET /v1/deliveries a 500 (a next attempt in a year no calendar writes). Ten years is the
    most any duration may be; the listing writes such a time as the latest one it can."""
    from relay.spool.records import iso

    found = problems("""
        delivery: {retry_window: 100000000000000000000d, backoff_max: 3651d}
        destinations: [{name: a, format: braze, url: "https://h/"}]
    """)
    assert "3650d" in found["delivery.retry_window"] and "3650d" in found["delivery.backoff_max"]
    assert parse_duration("3650d") == 3650 * 86400
    assert iso(1e20) == "9999-12-31T23:59:59.999Z"


def test_header_names_values_and_jwt_claims_that_no_request_can_carry_are_errors() -> None:
    """A header name with a space, an empty one, a value with a line break, and JWT claims
    YAML reads as something JSON cannot write (an unquoted date) passed check-config, then
    every delivery failed (into the dead letter, for good). They are errors naming the key."""
    found = problems("""
        destinations:
          - {name: a, format: braze, url: "https://h/", headers: {"Bad Header": x}}
          - {name: b, format: braze, url: "https://h/", headers: {X-A: "one\\r\\nX-B: two"}}
          - {name: c, format: braze, url: "https://h/",
             auth: {type: jwt, algorithm: HS256, key: kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk,
                    header: ""}}
          - {name: d, format: braze, url: "https://h/",
             auth: {type: jwt, algorithm: HS256, key: kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk,
                    claims: {since: 2024-01-01}}}
    """)
    assert any(path.startswith("destinations[0].headers") for path in found), found
    assert any(path.startswith("destinations[1].headers") for path in found), found
    assert "header name" in found["destinations[2].auth.header"], found
    assert "JSON" in found["destinations[3].auth.claims"], found


def test_nested_yaml_aliases_that_expand_to_millions_of_values_are_refused() -> None:
    """A few hundred bytes of aliases nested in aliases ("billion laughs") took 12.7 s and
    521 MB at seven levels, and every reload read them again; past a million values the
    config is refused at once, saying why."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 10) + "]" for n in range(1, 8)]
    with pytest.raises(ConfigError) as info:
        parse_config("x-laughs:\n  " + "\n  ".join(levels) + "\n", env={})
    assert "aliases" in str(info.value)


def test_port_0_in_a_url_is_checked_against_allowed_ports() -> None:
    """``https://h:0/`` was taken as the scheme's default port, passed delivery.allowed_ports
    and was then tried as port 0."""
    found = problems("""
        destinations: [{name: a, format: braze, url: "https://example.com:0/x"}]
    """)
    assert "port 0" in found["destinations[0].url"], found


@pytest.mark.parametrize("value", ["${HOME-x}", "${RT UNSET}", "${A:-${B}}", "x ${", "${}"])
def test_a_malformed_environment_reference_is_an_error(value: str) -> None:
    """``${`` that does not make ``${NAME}`` or ``${NAME:-fallback}`` was sent literally (a
    header ``X-Dash: ${HOME-x}``); it is an error naming the key. ``$$`` stays a literal
    ``$`` and a ``$`` without a brace is text."""
    found = problems(f"""
        destinations: [{{name: a, format: braze, url: "https://h/", headers: {{X-A: "{value}"}}}}]
    """, env={"A": "a", "B": "b"})
    assert "${NAME}" in found["destinations[0].headers.X-A"], found
    config = parse_config("""
        destinations: [{name: a, format: braze, url: "https://h/",
                        headers: {X-A: "$$HOME $HOME ${A} ${C:-c}"}}]
    """, env={"A": "a"})
    assert config.destinations[0].headers == {"X-A": "$HOME $HOME a c"}



def test_booleans_are_not_numbers() -> None:
    """`max_retries: true` was 1 retry and `concurrency: yes` one request at a time (pydantic
    reads a boolean as 1 or 0); they are errors. A number from ${VAR} (text) still reads."""
    found = problems("""
        server: {workers: on}
        delivery: {max_retries: true, concurrency: yes}
        health: {failure_rate: true}
        destinations: [{name: a, format: braze, url: "https://h/"}]
    """)
    for path in ("server.workers", "delivery.max_retries", "delivery.concurrency",
                 "health.failure_rate"):
        assert "not true" in found[path], (path, found)
    config = parse_config("""
        delivery: {max_retries: "${RETRIES}"}
        destinations: [{name: a, format: braze, url: "https://h/"}]
    """, env={"RETRIES": "3"})
    assert config.delivery.max_retries == 3


def test_a_destinations_first_backoff_longer_than_its_longest_is_an_error() -> None:
    """The same mistake in `delivery` was an error; on a destination (its own, or one side
    from `delivery`) it passed and the first backoff was quietly the longest."""
    found = problems("""
        delivery: {backoff_max: 10m}
        destinations:
          - {name: a, format: braze, url: "https://h/", backoff_initial: 1h}
          - {name: b, format: braze, url: "https://h/", backoff_initial: 5m, backoff_max: 1m}
          - {name: c, format: braze, url: "https://h/", backoff_max: 1h}
    """)
    assert "must not exceed" in found["destinations[0].backoff_initial"], found
    assert "must not exceed" in found["destinations[1].backoff_initial"], found
    assert not [path for path in found if path.startswith("destinations[2]")], found


def test_empty_destination_secrets_are_errors() -> None:
    """An empty bearer token was sent as `Authorization: Bearer ` and counted delivered; an
    empty client secret, user name or whsec_ key failed every request."""
    found = problems("""
        destinations:
          - {name: a, format: braze, url: "https://h/", auth: {type: bearer, token: ""}}
          - {name: b, format: braze, url: "https://h/",
             auth: {type: basic, username: "", password: ""}}
          - {name: c, format: braze, url: "https://h/",
             auth: {type: oauth2, token_url: "https://h/token", client_id: x, client_secret: ""}}
          - {name: d, format: braze, url: "https://h/", auth: {type: hmac, secret: whsec_}}
    """)
    for path in ("destinations[0].auth.token", "destinations[1].auth.username",
                 "destinations[2].auth.client_secret", "destinations[3].auth.secret"):
        assert path in found, (path, found)
    # (an empty basic password is a shape receivers use: an API key as the user name)
    assert "destinations[1].auth.password" not in found


def test_a_language_variants_url_is_checked_as_the_destinations_is() -> None:
    """A variant's url (ftp://, a host outside allowed_hosts) passed check-config, and every
    delivery in that language failed at send time."""
    found = problems("""
        destinations:
          - name: crm
            format: template
            url: "https://crm.example.com/{{ event.message_id }}"
            template:
              body: {type: json, fields: {s: "{{ event.status }}"}}
              variants:
                fr: {url: "ftp://crm.example.com/x"}
                de: {url: "https://evil.example.com/{{ event.message_id }}"}
                es: {url: "https://crm.example.com/es/{{ event.message_id }}"}
    """)
    assert "destinations[0].template.variants.fr.url" in found, found
    assert "allowed_hosts" in found["destinations[0].template.variants.de.url"], found
    assert not [path for path in found if ".es." in path], found


def test_a_language_variants_port_is_checked_as_each_request_is(tmp_path: Path) -> None:
    """A variant url on another port than the destination's url: allowed by
    delivery.allowed_ports, but not by the destination's own port rule that every rendered
    url meets before it is sent. It passed the config check, and every delivery in that
    language failed at send time. Now the config is refused where the relay builds its
    destinations (serve, check-config, reload); with the port in the destination's
    allowed_ports it passes, and renders."""
    text = textwrap.dedent("""
        delivery: {allowed_ports: [443, 8443]}
        destinations:
          - name: crm
            format: template
            url: "https://crm.example.com/{{ event.message_id }}"
            template:
              body: {type: json, fields: {s: "{{ event.status }}"}}
              variants:
                fr: {url: "https://crm.example.com:8443/fr/{{ event.message_id }}"}
                de: {url: "https://crm.example.com/de/{{ event.message_id }}"}
                it: {url: "ftp://crm.example.com/x"}
    """)
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_destinations(path, env={})
    found = dict(info.value.problems)
    assert "port 8443" in found["destinations[0].template.variants.fr.url"], found
    assert "allowed_ports" in found["destinations[0].template.variants.fr.url"], found
    assert not [path for path in found if ".de." in path], found
    # one message for a url both passes refuse (validation's)
    assert [p for p, _ in info.value.problems].count(
        "destinations[0].template.variants.it.url") == 1, info.value.problems
    path.write_text(text.replace("format: template\n", "format: template\n"
                                 "    allowed_ports: [443, 8443]\n")
                    .replace('      it: {url: "ftp://crm.example.com/x"}\n', ""))
    loaded = load_destinations(path, env={})
    renderer = build_renderer(loaded.config.destinations[0], loaded.config)
    for language, url in (("fr", "https://crm.example.com:8443/fr/m-1"),
                          ("de", "https://crm.example.com/de/m-1")):
        request = renderer.render(load_event(json.dumps(
            {"id": "e", "channel": "email", "status": "sent", "message_id": "m-1",
             "language": language})), "dlv_1")
        assert request.url == url


def test_file_keys_inside_headers_and_fields_are_plain_names(tmp_path: Path) -> None:
    """``headers: {token_file: ...}`` read that file into a header (any file the relay can
    read), and a body field named key_file could not be used; inside headers, body fields and
    JWT claims a *_file key is a name like any other."""
    config = parse_config("""
        destinations:
          - name: crm
            format: template
            url: "https://crm.example.com/hook"
            headers: {token_file: /etc/hostname}
            template: {body: {type: json, fields: {key_file: "{{ event.status }}"}}}
    """, env={}, base_dir=tmp_path)
    dest = config.destinations[0]
    assert dest.headers == {"token_file": "/etc/hostname"}
    assert dest.template is not None and "key_file" in dest.template.body.fields  # type: ignore[union-attr]


def test_yaml_merge_keys_share_settings_between_destinations() -> None:
    """``<<: *defaults`` was a "YAML syntax error" naming no key; merged keys now come in as
    YAML defines them, a destination's own keys override them, and its own keys still may not
    repeat."""
    config = parse_config("""
        destinations:
          - &crm {name: a, format: braze, url: "https://h/a", timeout: 5s}
          - {<<: *crm, name: b, url: "https://h/b"}
    """, env={})
    b = config.destinations[1]
    assert (b.name, b.url, b.timeout) == ("b", "https://h/b", 5.0)
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        parse_config("""
            destinations:
              - &crm {name: a, format: braze, url: "https://h/a"}
              - {<<: *crm, name: b, name: c}
        """, env={})


@pytest.mark.parametrize("listen", ["http://127.0.0.1:8080", "127.0.0.1:\u00b2",
                                    "127.0.0.1:\u0668\u0660", "127.0.0.1 :8080"])
def test_a_listen_address_is_host_and_ascii_port_only(listen: str) -> None:
    """A URL, a superscript or another script's digits as the port passed the check (the
    superscript then failed in int(), the URL in the resolver, naming no key)."""
    found = problems(f"""
        server: {{listen: "{listen}"}}
        destinations: [{{name: a, format: braze, url: "https://h/"}}]
    """)
    assert "host:port" in found["server.listen"], found


def test_lists_that_match_nothing_and_odd_language_tags_are_errors() -> None:
    """``channels: []`` or ``statuses: []`` made a destination that never gets an event; a
    variant keyed "" or "not a lang!" could never be chosen; ``pool_size`` below the 3 its
    description asks for was taken."""
    found = problems("""
        spool: {postgres: {pool_size: 2}}
        destinations:
          - {name: a, format: braze, url: "https://h/", channels: []}
          - {name: b, format: braze, url: "https://h/", statuses: []}
          - name: c
            format: template
            url: "https://h/c"
            template:
              body: {type: json, fields: {s: "{{ event.status }}"}}
              variants: {"not a lang!": {method: PUT}, fr-CA: {method: PUT}}
    """)
    assert "destinations[0].channels" in found and "destinations[1].statuses" in found, found
    assert any("not a lang!" in path for path in found), found
    assert not any("fr-CA" in path for path in found), found
    assert "spool.postgres.pool_size" in found, found


def test_type_errors_are_said_in_yaml_words() -> None:
    """pydantic's "valid tuple" and "valid dictionary or instance of ServerConfig" named
    Python types; a config's author wrote a list or a mapping."""
    found = problems("""
        server: [1]
        delivery: {allowed_ports: 5}
        destinations: [{name: a, format: braze, url: "https://h/", channels: email}]
    """)
    assert found["server"] == "expected a mapping (key: value pairs)"
    assert found["delivery.allowed_ports"] == "expected a list (got 5)"
    assert found["destinations[0].channels"] == "expected a list (got 'email')"


def test_an_internal_ip_literal_url_is_refused_at_check_time() -> None:
    """https://10.0.0.5/ passed check-config and every request was then refused by the egress
    rules (into the dead letter); it is an error naming the url and the way to allow it. A
    listed network is fine, and a name is judged by what it resolves to, at send time."""
    found = problems("""
        destinations: [{name: a, format: braze, url: "https://10.0.0.5/hook"}]
    """)
    assert "delivery.allowed_networks" in found["destinations[0].url"], found
    parse_config("""
        delivery: {allowed_networks: [10.0.0.0/8]}
        destinations: [{name: a, format: braze, url: "https://10.0.0.5/hook"},
                       {name: b, format: braze, url: "https://internal.example/hook"}]
    """, env={})


@pytest.mark.parametrize("schema", ["\u00e9" * 40, "information_schema", "pg_relay"])
def test_a_postgres_schema_name_postgres_would_cut_or_owns_is_an_error(schema: str) -> None:
    """40 and 45 accented letters passed (63 characters at most), and PostgreSQL cut both to
    the same 62 bytes: two relays "apart" shared every table. information_schema put the
    relay's tables in PostgreSQL's catalogue; pg_ names are reserved."""
    found = problems(f"""
        spool: {{backend: postgres, postgres: {{dsn: "postgresql://u@db/r", schema: "{schema}"}}}}
        destinations: [{{name: a, format: braze, url: "https://h/"}}]
    """)
    assert "spool.postgres.schema" in found, found


def test_a_dsn_its_client_cannot_read_is_an_error_that_never_shows_the_password() -> None:
    """An unescaped / in the password passed check-config; serve then died with asyncpg's
    "invalid literal for int() with base 10: 'Pw9secret'", the password in the clear."""
    found = problems("""
        spool: {backend: postgres, postgres: {dsn: "postgresql://u:Pw9secret/rest@localhost/db"}}
        destinations: [{name: a, format: braze, url: "https://h/"}]
    """)
    assert "percent-encoded" in found["spool.postgres.dsn"], found
    assert "Pw9secret" not in str(found)


def test_a_dsn_sslmode_its_client_refuses_is_an_error() -> None:
    """check-config said OK to sslmode=bogus; serve could not connect."""
    found = problems("""
        spool: {backend: postgres, postgres: {dsn: "postgresql://u:Pw9@db/relay?sslmode=bogus"}}
        destinations: [{name: a, format: braze, url: "https://h/"}]
    """)
    assert "sslmode must be one of disable" in found["spool.postgres.dsn"], found
    for mode in ("disable", "require", "verify-full"):
        parse_config(f"""
            spool: {{backend: postgres, postgres: {{dsn: "postgresql://u@db/r?sslmode={mode}"}}}}
            destinations: [{{name: a, format: braze, url: "https://h/"}}]
        """, env={})


async def test_a_dsn_asyncpg_cannot_parse_fails_open_without_the_password() -> None:
    from relay.errors import SpoolError
    from relay.spool.postgres import PostgresSpool

    spool = PostgresSpool("postgresql://u:Pw9secret/rest@localhost/db")
    with pytest.raises(SpoolError) as info:
        await spool.open()
    assert "spool.postgres.dsn" in str(info.value) and "Pw9secret" not in str(info.value)


def test_a_lease_that_ends_before_an_attempt_could_is_an_error_and_multi_host_dsns_pass(
        ) -> None:
    """An explicit spool.postgres.lease no longer than the longest timeout let another replica
    send a delivery while it was still in flight (and rows claimed with it were never started
    by the lease check); it is an error. DSNs with several hosts (urllib cannot split them),
    and variants keyed by POSIX locales (pt_BR), pass as they did."""
    found = problems("""
        spool: {backend: postgres, postgres: {dsn: "postgresql://u:p@db1:5432,db2:5432/r",
                                              lease: 60s}}
        destinations:
          - {name: a, format: braze, url: "https://h/", timeout: 90s}
          - name: c
            format: template
            url: "https://h/c"
            template:
              body: {type: json, fields: {s: "{{ event.status }}"}}
              variants: {pt_BR: {method: PUT}}
    """)
    assert list(found) == ["spool.postgres.lease"], found
    assert "90s" in found["spool.postgres.lease"]


def test_a_method_in_any_case_is_stored_upper_cased() -> None:
    """`method: post` (a variant's `Put`) is POST (PUT), not refused for its case; a word that
    is no method is refused as it was written."""
    config = parse_config("""
        destinations:
          - name: c
            format: template
            url: "https://h/c"
            template: {method: post, variants: {fr: {method: Put}}}
    """, env={})
    template = config.destinations[0].template
    assert template is not None and template.method == "POST"
    assert template.variants["fr"].method == "PUT"
    found = problems("""
        destinations:
          - {name: c, format: template, url: "https://h/c", template: {method: fetch}}
    """)
    assert found == {"destinations[0].template.method": "must be one of 'GET', 'POST', 'PUT', "
                                                        "'PATCH' or 'DELETE' (got 'fetch')"}
