"""Config values that validated but could never work (a token no client can send, a header the
relay sets itself, an allowed_hosts entry no URL matches...) are config errors naming their
path, found by the one load that serve, check-config and reload run: never a traceback."""

from __future__ import annotations

import base64
import subprocess
import sys
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


@pytest.mark.parametrize("token", ["RELAYTOKEN-123456\n", "RELAYTOKEN-123456 ", " RELAYTOKEN",
                                   "RELAYTOKEN\t12", "RELAYTOKEN-tök€n", "RELAY\x7fTOKEN",
                                   "RELAY\x00TOKEN", "\u00a0RELAYTOKEN"])
def test_server_token_no_client_can_send_is_refused(tmp_path: Path, token: str) -> None:
    """A server.token (here from ${RELAY_TOKEN}) with whitespace, a control character or a
    non-ASCII character is refused, without being echoed: every /v1 request would get 401."""
    found = problems(tmp_path, SERVER, env={"RELAY_TOKEN": token})
    assert "visible ASCII" in found["server.token"], found
    assert "RELAYTOKEN" not in found["server.token"]


def test_server_token_with_a_space_inside_is_kept_and_replay_holds_the_same_rule(
        tmp_path: Path) -> None:
    """A space inside the token worked (the server compares it stripped) and still does
    (helper-39's review); relay replay, which reads the token alone, refuses what serve
    refuses instead of sending it and getting 401."""
    from relay.config.load import read_access

    assert loads(tmp_path, SERVER, env={"RELAY_TOKEN": "RELAY TOKEN"}).config.server.token
    assert read_access(write(tmp_path, SERVER), env={"RELAY_TOKEN": "RELAY TOKEN"}).token
    with pytest.raises(ConfigError) as info:
        read_access(write(tmp_path, SERVER), env={"RELAY_TOKEN": "RELAYTOKEN\n"})
    assert "visible ASCII" in dict(info.value.problems)["server.token"]


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


# ---------------------------------------------------------------------------------------------
# File paths: a NUL byte is named, not a ValueError traceback

BRAZE = '{name: b, format: braze, url: "https://hooks.example.com/b"'


@pytest.mark.parametrize(("text", "path"), [
    ('delivery: {ca_file: "/tmp/a\\0b"}', "delivery.ca_file"),
    ('spool: {path: "/tmp/a\\0b"}', "spool.path"),
    (f'destinations: [{BRAZE}, tls: {{ca_file: "/tmp/a\\0b"}}}}]', "destinations[0].tls.ca_file"),
    (f'destinations: [{BRAZE}, tls: {{cert_file: "/tmp/a\\0b", key_file: /tmp/k}}}}]',
     "destinations[0].tls.cert_file"),
    (f'destinations: [{BRAZE}, tls: {{cert_file: /tmp/c, key_file: "a\\0b"}}}}]',
     "destinations[0].tls.key_file"),
])
def test_nul_in_a_file_path_is_a_config_error(tmp_path: Path, text: str, path: str) -> None:
    """A file path key holding a NUL byte is a config error naming the key (it was a
    'embedded null byte' ValueError traceback, or for spool.path one when serve opened it)."""
    found = problems(tmp_path, text)
    assert "NUL" in found[path], found


@pytest.mark.parametrize(("text", "path"), [
    ('server: {token_file: "/tmp/a\\0b"}', "server.token_file"),
    (f'destinations: [{BRAZE}, auth: {{type: bearer, token_file: "/tmp/a\\0b"}}}}]',
     "destinations[0].auth.token_file"),
])
def test_nul_in_a_secret_file_path_is_a_config_error(tmp_path: Path, text: str,
                                                     path: str) -> None:
    """A secret file path (token_file, password_file, ...) with a NUL byte is a config error
    naming the key."""
    found = problems(tmp_path, text)
    assert "NUL" in found[path] or "null" in found[path], found


# ---------------------------------------------------------------------------------------------
# auth.header: not a header the relay sets itself or one that breaks the request

JWT_KEY = "JWTKEY-0123456789-0123456789-0123456789"
RESERVED = ["Content-Type", "content-length", "Host", "User-Agent", "Webhook-Id",
            "Transfer-Encoding", "Connection"]


@pytest.mark.parametrize("header", RESERVED)
@pytest.mark.parametrize("auth", [
    f"{{type: jwt, key: {JWT_KEY}, header: HEADER}}",
    "{type: oauth2, token_url: https://idp.example.com/token, client_id: c, "
    "client_secret: s, header: HEADER}",
])
def test_auth_header_the_relay_sets_is_refused(tmp_path: Path, header: str, auth: str) -> None:
    """jwt's or oauth2's auth.header naming Content-Type, Content-Length, Host, User-Agent,
    Webhook-Id, Transfer-Encoding or Connection is refused at auth.header (the token
    replaced that header, unmasked, or broke every request). Webhook-Signature and
    -Timestamp are hmac's only: a jwt may go there (helper-39's review)."""
    found = problems(tmp_path, f"""
        destinations:
          - {{{BRAZE.removeprefix("{")}, auth: {auth.replace("HEADER", header)}}}
    """)
    assert "the relay sets" in found["destinations[0].auth.header"], found


def test_auth_header_of_its_own_loads(tmp_path: Path) -> None:
    """A header of the receiver's own, such as X-Api-Token, is still fine, and so is a
    Webhook-Signature under jwt (the relay writes it for hmac only)."""
    for header in ("X-Api-Token", "Webhook-Signature"):
        loads(tmp_path, f"""
            destinations:
              - {{{BRAZE.removeprefix("{")}, auth: {{type: jwt, key: {JWT_KEY}, header: {header}}}}}
        """)


# ---------------------------------------------------------------------------------------------
# Configured headers: none the HTTP client frames the request with, none the relay overwrites

@pytest.mark.parametrize("header", ["content-length", "Transfer-Encoding", "Connection"])
@pytest.mark.parametrize("value", ["static.example.net", "{{ event.attributes.order_id }}.example"])
def test_configured_framing_header_is_refused(tmp_path: Path, header: str, value: str) -> None:
    """headers: Content-Length, Transfer-Encoding or Connection is refused, in a variant
    too."""
    found = problems(tmp_path, f"""
        delivery: {{allowed_networks: [127.0.0.0/8]}}
        destinations:
          - name: t
            format: template
            url: "http://127.0.0.1/hook"
            headers: {{{header}: "{value}"}}
            template:
              method: POST
              variants: {{fr: {{headers: {{{header}: "{value}"}}}}}}
    """)
    for path in (f"destinations[0].headers.{header}",
                 f"destinations[0].template.variants.fr.headers.{header}"):
        assert "HTTP client" in found[path], found


def test_a_host_header_is_fixed_text_beside_a_fixed_url_host(tmp_path: Path) -> None:
    """A fixed Host beside a fixed url (an IP url naming its virtual host: it worked, and
    helper-39's review found it refused) loads; a rendered one, or one beside a rendered url
    host, would let event data pick a virtual host past allowed_hosts, and is refused."""
    loads(tmp_path, """
        destinations:
          - {name: b, format: braze, url: "https://203.0.113.10/hooks",
             headers: {Host: hooks.example.com}}
    """)
    found = problems(tmp_path, """
        delivery: {allowed_networks: [127.0.0.0/8]}
        destinations:
          - name: t
            format: template
            url: "http://127.0.0.1/hook"
            headers: {Host: "{{ event.attributes.order_id }}.internal.example"}
            template: {method: POST}
          - name: u
            format: template
            url: "http://{{ event.attributes.h }}/hook"
            allowed_hosts: [127.0.0.1]
            headers: {Host: fixed.example}
            template: {method: POST}
    """)
    assert "fixed text beside a url whose host is fixed" in found["destinations[0].headers.Host"]
    assert "fixed text beside a url whose host is fixed" in found["destinations[1].headers.Host"]


@pytest.mark.parametrize(("auth", "header", "owner"), [
    ("{type: none}", "Webhook-Id", "delivery id"),
    ("{type: none}", "user-agent", "User-Agent"),
    ("{type: bearer, token: t0k}", "Authorization", "auth (type bearer)"),
    ("{type: basic, username: u, password: p}", "authorization", "auth (type basic)"),
    (f"{{type: jwt, key: {JWT_KEY}}}", "Authorization", "auth.header"),
    (f"{{type: jwt, key: {JWT_KEY}, header: X-Token}}", "x-token", "auth.header"),
    ("{type: oauth2, token_url: https://idp.example.com/t, client_id: c, client_secret: s}",
     "Authorization", "auth.header"),
    ("{type: hmac, secret: whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=}", "Webhook-Signature",
     "auth (type hmac)"),
])
def test_configured_header_the_relay_overwrites_is_refused(tmp_path: Path, auth: str,
                                                           header: str, owner: str) -> None:
    """A configured header the relay replaces silently (Webhook-Id, User-Agent, the auth
    type's own) is refused, saying which setting owns it."""
    found = problems(tmp_path, f"""
        destinations:
          - {BRAZE}, auth: {auth}, headers: {{{header}: mine}}}}
    """)
    assert owner in found[f"destinations[0].headers.{header}"], found


def test_authorization_header_without_an_auth_type_setting_it_loads(tmp_path: Path) -> None:
    """With auth none or hmac, a configured Authorization header is the one sent: kept."""
    loads(tmp_path, f"""
        destinations:
          - {BRAZE}, headers: {{Authorization: "Token mine"}}}}
          - {BRAZE.replace("name: b", "name: h")}, headers: {{Authorization: "Token mine",
             Content-Type: application/cloudevents+json}},
             auth: {{type: hmac, secret: whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=}}}}
    """)


def test_configured_headers_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    """X-Env: a and x-env: b were both sent (the receiver saw two values): refused, naming
    both, in a static destination's headers, a template's and a variant's; an auth header
    written in another case than a configured one was refused already."""
    found = problems(tmp_path, f"""
        destinations:
          - {BRAZE}, headers: {{X-Env: a, X-Other: c, x-env: b}}}}
          - name: t
            format: template
            url: "https://h.example.com/t"
            headers: {{X-Env: "{{{{ event.status }}}}", X-ENV: b}}
            template:
              method: POST
              variants: {{fr: {{headers: {{x-lang: fr, X-Lang: fr}}}}}}
          - {BRAZE.replace("name: b", "name: j")}, headers: {{x-api-token: mine}},
             auth: {{type: jwt, key: {JWT_KEY}, header: X-Api-Token}}}}
    """)
    same = "are the same header (names are compared without regard to case): keep one"
    assert found == {
        "destinations[0].headers": f"'X-Env' and 'x-env' {same}",
        "destinations[1].headers": f"'X-Env' and 'X-ENV' {same}",
        "destinations[1].template.variants.fr.headers": f"'x-lang' and 'X-Lang' {same}",
        "destinations[2].headers.x-api-token": "x-api-token is set by auth (type jwt; its "
                                               "auth.header): a configured value would be "
                                               "replaced or break the request; remove it"}


def test_configured_headers_of_different_names_load(tmp_path: Path) -> None:
    """Distinct names load, and a variant's headers (which replace the destination's) may
    repeat a destination header's name in another case."""
    loads(tmp_path, f"""
        destinations:
          - {BRAZE}, headers: {{X-Env: a, X-Envs: b}}}}
          - name: t
            format: template
            url: "https://h.example.com/t"
            headers: {{X-Env: a}}
            template: {{method: POST, variants: {{fr: {{headers: {{x-env: b}}}}}}}}
    """)


# ---------------------------------------------------------------------------------------------
# Template variants: one per language, whatever the case

def test_variants_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    """Variants fr and FR (languages are matched without regard to case) are refused: one
    silently replaced the other."""
    found = problems(tmp_path, """
        destinations:
          - name: t
            format: template
            url: "https://example.com/hook"
            template:
              body: {type: json, fields: {msg: "default"}}
              variants:
                fr: {body: {type: json, fields: {msg: "from variant fr"}}}
                de: {body: {type: json, fields: {msg: "from variant de"}}}
                FR: {body: {type: json, fields: {msg: "from variant FR"}}}
    """)
    message = found["destinations[0].template.variants"]
    assert "'fr'" in message and "'FR'" in message and "'de'" not in message, found


# ---------------------------------------------------------------------------------------------
# tls.server_name: a host name the TLS handshake can carry

@pytest.mark.parametrize("name", ["a..b", "x" * 64 + ".example.com", "has space.example.com",
                                  "", " ", "-lead.example.com", "a/b", "*.example.com"])
def test_tls_server_name_that_is_no_host_name_is_refused(tmp_path: Path, name: str) -> None:
    """A tls.server_name that is not a host name is refused (it was a TLS traceback at every
    attempt)."""
    found = problems(tmp_path, f"""
        destinations:
          - {BRAZE}, tls: {{server_name: "{name}"}}}}
    """)
    assert "host name" in found["destinations[0].tls.server_name"], found


@pytest.mark.parametrize("name", ["hooks.bank.example", "10.0.0.7", "svc_a.internal", "::1"])
def test_tls_server_name_of_a_host_loads(tmp_path: Path, name: str) -> None:
    """Names and IP literals are still fine."""
    loads(tmp_path, f"""
        destinations:
          - {BRAZE}, tls: {{server_name: "{name}"}}}}
    """)


# ---------------------------------------------------------------------------------------------
# oauth2 token_url: no userinfo (never echoed), and the destination url's port and address rules

def oauth2(token_url: str, delivery: str = "{allowed_ports: [9000], allowed_networks: "
                                           "[127.0.0.0/8]}", own: str = "") -> str:
    return f"""
        delivery: {delivery}
        destinations:
          - name: o
            format: braze
            url: http://127.0.0.1:9000/dest
            {own}
            auth: {{type: oauth2, token_url: "{token_url}", client_id: cid,
                    client_secret: CLIENTSECRET-XYZ-123}}
    """


@pytest.mark.parametrize("url", ["http://user:TOKENURLPASSWORD@127.0.0.1:9000/token",
                                 "https://:TOKENURLPASSWORD@idp.example.com/token",
                                 "htps://client:TOKENURLPASSWORD@idp.example.com/token",
                                 "http://client:TOKENURLPASSWORD@idp.example.com:abc/token"])
def test_token_url_with_userinfo_is_refused_without_echoing_it(tmp_path: Path, url: str) -> None:
    """A token_url carrying user:password@ is refused at auth.token_url, and no message (nor an
    invalid scheme's or port's) repeats the password."""
    found = problems(tmp_path, oauth2(url))
    assert "destinations[0].auth.token_url" in found, found
    assert not [m for m in found.values() if "TOKENURLPASSWORD" in m], found


def test_check_config_does_not_print_a_token_url_password(tmp_path: Path) -> None:
    """relay check-config names auth.token_url and prints neither the password nor a
    traceback."""
    path = write(tmp_path, oauth2("htps://client:TOKENURLPASSWORD@idp.example.com/token"))
    done = subprocess.run([sys.executable, "-m", "relay", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "auth.token_url" in out, out
    assert "TOKENURLPASSWORD" not in out and "Traceback" not in out, out


@pytest.mark.parametrize(("url", "delivery", "own", "words"), [
    ("http://127.0.0.1:9123/token", None, "", "delivery.allowed_ports"),
    ("http://169.254.169.254/latest/token", "{allowed_ports: [80, 9000], "
     "allowed_networks: [127.0.0.0/8]}", "", "delivery.allowed_networks"),
    ("http://[::ffff:10.0.0.1]/token", "{allowed_ports: [80, 9000], "
     "allowed_networks: [127.0.0.0/8]}", "", "delivery.allowed_networks"),
])
def test_token_url_follows_the_destination_urls_port_and_address_rules(
        tmp_path: Path, url: str, delivery: str | None, own: str, words: str) -> None:
    """A token_url on a port outside delivery.allowed_ports, or at an internal address not in
    delivery.allowed_networks, is refused like the destination url."""
    found = problems(tmp_path, oauth2(url, *([delivery] if delivery else []), own=own))
    assert words in found["destinations[0].auth.token_url"], found


def test_token_url_in_allowed_networks_and_ports_loads(tmp_path: Path) -> None:
    """An internal token endpoint whose network and port are allowed loads; the destination's
    own allowed_ports are its host's, not the identity provider's (helper-39's review: a
    token_url on 443 beside a destination on 8443 only was refused)."""
    loads(tmp_path, oauth2("http://169.254.169.254:9000/token",
                           "{allowed_ports: [9000], allowed_networks: [127.0.0.0/8, "
                           "169.254.0.0/16]}"))
    loads(tmp_path, oauth2("https://idp.example.com/token", "{allowed_ports: [443, 9000], "
                           "allowed_networks: [127.0.0.0/8]}", own="allowed_ports: [9000]"))


# ---------------------------------------------------------------------------------------------
# a raw template body's content_type: a header value

def test_a_content_type_with_a_line_break_is_refused(tmp_path: Path) -> None:
    """`relay render` printed an injected header line from it, and every delivery failed."""
    found = problems(tmp_path, """
        destinations:
          - name: t
            format: template
            url: "https://h.example.com/x"
            template: {method: POST, body: {type: raw, template: "x",
                       content_type: "text/plain\\r\\nX-Injected: 1"}}
    """)
    assert "line break" in found["destinations[0].template.body.content_type"]


# ---------------------------------------------------------------------------------------------
# server.listen: a host that can be listened on

@pytest.mark.parametrize("listen", ["999.1.1.1:8080", "127.0.0.1\\t:8080", "a..b:8080",
                                    "1.2.3:8080"])
def test_a_listen_host_that_is_no_address_is_refused(tmp_path: Path, listen: str) -> None:
    """check-config said OK and serve failed with "Name or service not known". (The tab is
    written as YAML's \\t escape.)"""
    found = problems(tmp_path, f"""
        server: {{listen: "{listen}", allow_unauthenticated: true}}
        destinations: [{{name: b, format: braze, url: "https://h.example.com/b"}}]
    """)
    assert "not a host name or IP address" in found["server.listen"]


def test_listen_hosts_that_are_names_or_addresses_are_kept(tmp_path: Path) -> None:
    for listen in ("localhost:8080", "[::1]:0", "0.0.0.0:80", ":8080", "relay-0.svc.local:1"):
        loads(tmp_path, f"""
            server: {{listen: "{listen}", allow_unauthenticated: true}}
            destinations: [{{name: b, format: braze, url: "https://h.example.com/b"}}]
        """)


# ---------------------------------------------------------------------------------------------
# template values without Liquid over the limits every rendered value is held to

def test_a_static_url_or_header_over_8_kib_is_refused(tmp_path: Path) -> None:
    """Each failed every render ("rendered longer than 8192 bytes"); check-config said OK."""
    found = problems(tmp_path, f"""
        destinations:
          - name: t
            format: template
            url: "https://h.example.com/{'a' * 9000}"
            headers: {{X-Big: "{'b' * 9000}", X-Fine: "{'c' * 100}"}}
            template: {{method: GET}}
    """)
    assert found["destinations[0].url"] == "is longer than 8192 bytes"
    assert found["destinations[0].headers.X-Big"] == "is longer than 8192 bytes"
    assert "destinations[0].headers.X-Fine" not in found


# ---------------------------------------------------------------------------------------------
# server.allow_cidrs: protection only if it leaves someone out

def test_allow_cidrs_letting_every_address_in_is_no_protection(tmp_path: Path) -> None:
    """A non-loopback listen needs a token, client networks or an explicit open API; 0.0.0.0/0
    and ::/0 passed as client networks while they let everyone in (helper-37's doubt)."""
    for cidrs in ('["0.0.0.0/0"]', '["10.0.0.0/8", "::/0"]'):
        found = problems(tmp_path, f"""
            server: {{listen: "0.0.0.0:8080", allow_cidrs: {cidrs}}}
            destinations: [{{name: b, format: braze, url: "https://h.example.com/b"}}]
        """)
        assert "protects nothing" in found["server.allow_cidrs"], found
    for server in ('{listen: "0.0.0.0:8080", allow_cidrs: ["10.0.0.0/8"]}',
                   '{listen: "0.0.0.0:8080", allow_cidrs: ["0.0.0.0/0"], token: t0k3n}',
                   '{listen: "0.0.0.0:8080", allow_cidrs: ["0.0.0.0/0"], '
                   'allow_unauthenticated: true}',
                   '{listen: "127.0.0.1:8080", allow_cidrs: ["0.0.0.0/0"]}'):
        loads(tmp_path, f"""
            server: {server}
            destinations: [{{name: b, format: braze, url: "https://h.example.com/b"}}]
        """)


# ---------------------------------------------------------------------------------------------
# Liquid filter calls: arguments the filter can take

def test_a_filter_call_with_wrong_arguments_is_refused_at_its_path(tmp_path: Path) -> None:
    """`| append` without its argument, or `| upcase: 1`, passed check-config and failed every
    render; now each is refused at the field's path, naming the filter, in a variant too."""
    found = problems(tmp_path, """
        destinations:
          - name: t
            format: template
            url: "https://h.example.com/{{ event.id | url_param_escape: 1 }}"
            headers: {X-Status: "{{ event.status | upcase }}"}
            template:
              body: {type: json, fields: {status: "{{ event.status | append }}",
                                          fine: "{{ event.status | append: '!' }}"}}
              variants: {fr: {body: {type: raw, template: "{{ event.status | upcase: 1 }}"}}}
    """)
    assert found == {
        "destinations[0].url": "Liquid: filter 'url_param_escape' (line 1, column 37) takes no "
                               "arguments (got 1)",
        "destinations[0].template.body.fields.status": "Liquid: filter 'append' (line 1, "
                                                       "column 19) takes 1 argument (got none)",
        "destinations[0].template.variants.fr.body.template": "Liquid: filter 'upcase' (line 1, "
                                                              "column 19) takes no arguments "
                                                              "(got 1)"}


# ---------------------------------------------------------------------------------------------
# Delivery numbers: within what can be meant

@pytest.mark.parametrize(("text", "path", "message"), [
    ("delivery: {timeout: 3650d}", "delivery.timeout",
     "must be between 1ms and 1h (got 3.1536e+08s)"),
    ("delivery: {timeout: 61m}", "delivery.timeout", "must be between 1ms and 1h (got 3660s)"),
    ("delivery: {timeout: 0.5ms}", "delivery.timeout",
     "must be between 1ms and 1h (got 0.0005s)"),
    (f"destinations: [{BRAZE}, timeout: 2h}}]", "destinations[0].timeout",
     "must be between 1ms and 1h (got 7200s)"),
    ("delivery: {rate_limit: {per_second: 0.000001}}", "delivery.rate_limit.per_second",
     "input should be greater than or equal to 0.00001 (got 1e-06)"),
    (f"destinations: [{BRAZE}, rate_limit: {{per_second: 1e-300}}}}]",
     "destinations[0].rate_limit.per_second",
     "input should be greater than or equal to 0.00001 (got '1e-300')"),
    ("delivery: {rate_limit: {per_second: 1000000000000}}", "delivery.rate_limit.per_second",
     "input should be less than or equal to 1000000 (got 1000000000000)"),
    ("delivery: {rate_limit: {per_second: .nan}}", "delivery.rate_limit.per_second",
     "input should be greater than or equal to 0.00001 (got nan)"),
    ("delivery: {rate_limit: {per_second: .inf}}", "delivery.rate_limit.per_second",
     "input should be less than or equal to 1000000 (got inf)"),
])
def test_a_delivery_number_that_cannot_be_meant_is_refused(tmp_path: Path, text: str,
                                                           path: str, message: str) -> None:
    """A timeout of ten years (a receiver that never answers held a request slot for good) or
    of half a millisecond, a rate of one attempt in 10^300 seconds: refused at the key with
    the range (a rate of 10^12, NaN or infinity was refused already)."""
    assert problems(tmp_path, text) == {path: message}


def test_delivery_numbers_at_the_bounds_load(tmp_path: Path) -> None:
    """1ms and 1h timeouts, and rates from 0.00001 (about one a day) to 1,000,000, load."""
    loaded = loads(tmp_path, f"""
        delivery: {{timeout: 1h, rate_limit: {{per_second: 0.00001}}}}
        destinations:
          - {BRAZE}, timeout: 1ms, rate_limit: {{per_second: 1000000}}}}
    """)
    assert loaded.config.delivery.timeout == 3600.0
    assert loaded.config.destinations[0].timeout == 0.001


# ---------------------------------------------------------------------------------------------
# hmac secrets: a key, not a byte or two

def _whsec(size: int) -> str:
    return "whsec_" + base64.b64encode(bytes(range(65, 65 + size))).decode()


def test_an_hmac_secret_shorter_than_16_bytes_is_refused(tmp_path: Path) -> None:
    """A one-byte key (whsec_YQ==) was accepted, and anyone could sign as the relay after a
    few hundred tries; under 16 bytes once base64-decoded is refused at its own key (each
    of a rotation list's, not only the first), the secret not echoed."""
    found = problems(tmp_path, f"""
        destinations:
          - {BRAZE}, auth: {{type: hmac, secret: whsec_YQ==}}}}
          - {BRAZE.replace("name: b", "name: r")},
             auth: {{type: hmac, secrets: ["{_whsec(2)}", "{_whsec(24)}", "{_whsec(15)}"]}}}}
    """)
    needed = ("once base64-decoded; at least 16 are needed (Standard Webhooks secrets are 24 "
              "to 64 random bytes: 'whsec_' + `openssl rand -base64 32`)")
    assert found == {"destinations[0].auth.secret": f"the key is 1 byte {needed}",
                     "destinations[1].auth.secrets[0]": f"the key is 2 bytes {needed}",
                     "destinations[1].auth.secrets[2]": f"the key is 15 bytes {needed}"}


def test_hmac_secrets_of_16_bytes_or_more_load(tmp_path: Path) -> None:
    """16 bytes is enough; Standard Webhooks' 24 to 64 bytes load as before."""
    loads(tmp_path, f"""
        destinations:
          - {BRAZE}, auth: {{type: hmac, secrets: ["{_whsec(16)}", "{_whsec(24)}",
                                                   "{_whsec(64)}"]}}}}
    """)
