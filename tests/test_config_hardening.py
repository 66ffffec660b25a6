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
