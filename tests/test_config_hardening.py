"""Config values that validated but could never work (a token no client can send, a header the
relay sets itself, an allowed_hosts entry no URL matches...) are config errors naming their
path, found by the one load that serve, check-config and reload run: never a traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from relay.destinations import Loaded, load
from relay.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """What ``relay.destinations.load`` (serve, check-config) refuses in ``text``, by path."""
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env=env or {})
    return dict(info.value.problems)


def loads(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Loaded:
    return load(write(tmp_path, text), env=env or {})


# ---------------------------------------------------------------------------------------------
# server.token: what a client can send in an Authorization header

SERVER = """
    server: {token: "${RELAY_TOKEN}"}
    spool: {path: spool.db}
"""


@pytest.mark.parametrize("token", ["RELAYTOKEN-123456\n", "RELAYTOKEN 123456", "RELAYTOKEN\t12",
                                   "RELAYTOKEN-tök€n", "RELAY\x7fTOKEN", "RELAY\x00TOKEN",
                                   "\u00a0RELAYTOKEN"])
def test_server_token_no_client_can_send_is_refused(tmp_path: Path, token: str) -> None:
    """A server.token (here from ${RELAY_TOKEN}) with whitespace, a control character or a
    non-ASCII character is refused, without being echoed: every /v1 request would get 401."""
    found = problems(tmp_path, SERVER, env={"RELAY_TOKEN": token})
    assert "visible ASCII" in found["server.token"], found
    assert "RELAYTOKEN" not in found["server.token"]


def test_server_token_of_visible_ascii_and_token_file_newline_are_kept(tmp_path: Path) -> None:
    """Any visible ASCII character may be in the token, and a token_file's trailing newline is
    still stripped."""
    token = "Ab9-._~+/=!#$%&'*^`|{}[]()<>@,;:?\"\\"
    loaded = loads(tmp_path, SERVER, env={"RELAY_TOKEN": token})
    assert loaded.config.server.token is not None
    assert loaded.config.server.token.get_secret_value() == token
    (tmp_path / "token").write_text("from-a-file\n")
    loaded = loads(tmp_path, 'server: {token_file: token}\nspool: {path: spool.db}\n')
    assert loaded.config.server.token is not None
    assert loaded.config.server.token.get_secret_value() == "from-a-file"


# ---------------------------------------------------------------------------------------------
# Auth secrets sent in a header: no line break or NUL, as configured headers already


@pytest.mark.parametrize("bad", ["SECRETTOKEN1234\n", "SECRET\rTOKEN", "SECRET\x00TOKEN"])
@pytest.mark.parametrize(("auth", "path"), [
    ('{type: bearer, token: "${S}"}', "auth.token"),
    ('{type: basic, username: "${S}", password: pw}', "auth.username"),
    ('{type: basic, username: user, password: "${S}"}', "auth.password"),
])
def test_auth_secret_with_a_line_break_or_nul_is_refused(tmp_path: Path, bad: str, auth: str,
                                                         path: str) -> None:
    """A bearer token or basic username/password with CR, LF or NUL is a config error naming
    the key (the secret not echoed), as the same value under headers is: every delivery would
    fail with 'Forbidden control character'."""
    found = problems(tmp_path, f"""
        destinations:
          - {{name: b, format: braze, url: "https://hooks.example.com/b", auth: {auth}}}
    """, env={"S": bad})
    assert "line break or NUL" in found[f"destinations[0].{path}"], found
    assert not [m for m in found.values() if "SECRET" in m], found


def test_auth_secrets_that_fit_a_header_are_kept(tmp_path: Path) -> None:
    """Secrets with spaces or punctuation (no line break, no NUL) still load."""
    loads(tmp_path, """
        destinations:
          - {name: b, format: braze, url: "https://hooks.example.com/b",
             auth: {type: bearer, token: "tok en{{x}}"}}
          - {name: c, format: braze, url: "https://hooks.example.com/c",
             auth: {type: basic, username: "api key", password: "p a:ss"}}
    """)


# ---------------------------------------------------------------------------------------------
# allowed_hosts: "host" or "host:port", nothing a rendered URL's host can never equal

TEMPLATED_HOST = """
    delivery: {{allowed_networks: [127.0.0.0/8]}}
    destinations:
      - {{name: t, format: template, url: "http://{{{{ event.attributes.host }}}}/hook",
         allowed_hosts: {hosts}, template: {{method: POST}}}}
"""


@pytest.mark.parametrize("entry", ["https://127.0.0.1", "127.0.0.1/hook", "*.0.0.1",
                                   "127.0.0.1:abc", "", " ", "127.0.0.1:0", "127.0.0.1:70000",
                                   "a..b", "[::1]:x", "[nope]:443", "crm example.com",
                                   "user@crm.example.com"])
def test_allowed_hosts_entry_that_can_never_match_is_refused(tmp_path: Path, entry: str) -> None:
    """An allowed_hosts entry with a scheme, a path, a wildcard, a bad port or no host is
    refused at its index, saying the form expected (every delivery would fail)."""
    found = problems(tmp_path, TEMPLATED_HOST.format(hosts=f'["crm.example.com", "{entry}"]'))
    assert "host:port" in found["destinations[0].allowed_hosts[1]"], found
    assert "destinations[0].allowed_hosts[0]" not in found


def test_empty_allowed_hosts_with_a_templated_host_is_refused(tmp_path: Path) -> None:
    """allowed_hosts: [] where the url's host is a template lets no delivery through."""
    found = problems(tmp_path, TEMPLATED_HOST.format(hosts="[]"))
    assert "empty" in found["destinations[0].allowed_hosts"], found


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.1:443", "CRM.example.com",
                                   "crm.example.com:8443", "[::1]", "[::1]:443", "::1",
                                   "a_b.internal", "bücher.example"])
def test_allowed_hosts_entries_of_the_documented_forms_load(tmp_path: Path, entry: str) -> None:
    """Names, IPv4 and IPv6 literals, with or without a port, still load."""
    loads(tmp_path, TEMPLATED_HOST.format(hosts=f'["{entry}"]').replace(
        "allowed_networks: [127.0.0.0/8]", "allowed_ports: [80, 443, 8443]"))
