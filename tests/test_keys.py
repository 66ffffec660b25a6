"""JWT keys checked at load, per-request tokens, and `relay render` / `relay test` that never
print a traceback. Keys are minted with `cryptography` in the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from relay.auth import Signing
from relay.config import parse_config
from relay.destinations import compile_destinations
from relay.errors import ConfigError
from relay.request import Request
from tests.helpers import Clock, event, write_config

REQUEST = Request("POST", "https://h.example.com/x", {}, b"{}")
RSA_2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256 = ec.generate_private_key(ec.SECP256R1())


def private_pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def public_pem(key: Any) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def jwt_dest(name: str, algorithm: str, key: str, **auth: Any) -> dict[str, Any]:
    return {"name": name, "format": "braze", "url": "https://h.example.com/x",
            "auth": {"type": "jwt", "algorithm": algorithm, "key": key, **auth}}


def problems(*destinations: dict[str, Any]) -> dict[str, str]:
    """The ConfigError problems of loading these destinations, by path."""
    with pytest.raises(ConfigError) as info:
        compile_destinations(parse_config(json.dumps({"destinations": list(destinations)}),
                                          env={}))
    return dict(info.value.problems)


def run_relay(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "relay", *args], input=stdin,
                          capture_output=True, timeout=60)
    return subprocess.CompletedProcess(done.args, done.returncode,
                                       done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))


def test_every_key_that_cannot_sign_is_named_at_load() -> None:
    """A public key, an EC key on the wrong curve, a short RSA key, an Ed25519 key for RS256
    and a short HMAC secret are each a config error at destinations[i].auth.key, in a
    sentence (never a repr of a generator)."""
    found = problems(
        jwt_dest("public", "RS256", public_pem(RSA_2048)),
        jwt_dest("curve", "ES384", private_pem(P256)),
        jwt_dest("short-rsa", "RS256", private_pem(
            rsa.generate_private_key(public_exponent=65537, key_size=1024))),
        jwt_dest("ed-for-rs", "RS256", private_pem(ed25519.Ed25519PrivateKey.generate())),
        jwt_dest("rsa-for-es", "ES256", private_pem(RSA_2048)),
        jwt_dest("short-hmac", "HS256", "x" * 31),
        jwt_dest("ec-public", "ES256", public_pem(P256)),
        jwt_dest("rsa-for-eddsa", "EdDSA", private_pem(RSA_2048)),
    )
    assert set(found) == {f"destinations[{i}].auth.key" for i in range(8)}
    assert "public key" in found["destinations[0].auth.key"]
    assert "private key" in found["destinations[0].auth.key"]
    assert "secp384r1" in found["destinations[1].auth.key"]
    assert "secp256r1" in found["destinations[1].auth.key"]
    assert "1024 bits" in found["destinations[2].auth.key"]
    assert "2048" in found["destinations[2].auth.key"]
    assert "RSA" in found["destinations[3].auth.key"]
    assert "Ed25519" in found["destinations[3].auth.key"]
    assert "EC private key" in found["destinations[4].auth.key"]
    assert "32 bytes" in found["destinations[5].auth.key"]
    assert "public key" in found["destinations[6].auth.key"]
    assert "Ed25519" in found["destinations[7].auth.key"]
    assert not any("generator object" in message for message in found.values())


@pytest.mark.parametrize(("algorithm", "key"), [
    ("RS256", RSA_2048), ("PS512", RSA_2048), ("ES256", P256),
    ("ES512", ec.generate_private_key(ec.SECP521R1())),
    ("EdDSA", ed25519.Ed25519PrivateKey.generate())])
def test_keys_that_fit_their_algorithm_load_and_verify(algorithm: str, key: Any) -> None:
    """A private key of the right type, curve and size loads and its tokens verify."""
    compiled = compile_destinations(parse_config(json.dumps(
        {"destinations": [jwt_dest("d", algorithm, private_pem(key))]}), env={}))
    token = compiled["d"].signing.sign(REQUEST, "dlv").headers["Authorization"].split()[1]
    assert jwt.decode(token, key.public_key(), algorithms=[algorithm])["jti"]


def test_ttl_under_a_second_is_a_config_error() -> None:
    """`ttl: 500ms` would give exp == iat: refused at destinations[i].auth.ttl."""
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps({"destinations": [
            jwt_dest("d", "HS256", "k" * 32, ttl="500ms")]}), env={})
    found = dict(info.value.problems)
    assert "at least 1s" in found["destinations[0].auth.ttl"]


def test_reuse_false_mints_a_fresh_token_per_request() -> None:
    """With auth.reuse false, two requests carry different jti (and each its own iat);
    by default the token is reused."""
    clock = Clock(1000.0)

    def claims(signing: Signing) -> dict[str, Any]:
        token = signing.sign(REQUEST, "dlv").headers["Authorization"].split()[1]
        return jwt.decode(token, "k" * 32, algorithms=["HS256"], options={"verify_exp": False})

    config = parse_config(json.dumps({"destinations": [
        jwt_dest("fresh", "HS256", "k" * 32, reuse=False),
        jwt_dest("cached", "HS256", "k" * 32)]}), env={})
    compiled = compile_destinations(config, clock=clock)
    first = claims(compiled["fresh"].signing)
    clock.now += 5
    second = claims(compiled["fresh"].signing)
    assert first["jti"] != second["jti"]
    assert second["iat"] == first["iat"] + 5
    assert claims(compiled["cached"].signing)["jti"] == claims(compiled["cached"].signing)["jti"]


def test_check_config_names_a_public_key(tmp_path: Path) -> None:
    """`relay check-config` exits 1 naming destinations[0].auth.key for a public key."""
    path = write_config(tmp_path, destinations=[jwt_dest("d", "RS256", public_pem(RSA_2048))])
    done = run_relay("check-config", str(path))
    assert done.returncode == 1
    assert "destinations[0].auth.key" in done.stderr
    assert "Traceback" not in done.stderr


def bad_render_destinations() -> list[dict[str, Any]]:
    return [
        {"name": "crm", "format": "template", "url": "http://127.0.0.1:9/crm",
         "template": {"method": "POST", "body": {"type": "json",
                                                  "fields": {"s": "{{ event.status }}"}}}},
        {"name": "elsewhere", "format": "template",
         "url": "https://{{ event.attributes.host }}/x", "allowed_hosts": ["crm.example.com"],
         "template": {"method": "POST", "body": {"type": "json", "fields": {"a": "b"}}}},
    ]


@pytest.mark.parametrize("case", ["missing file", "invalid JSON", "invalid event",
                                  "unknown destination", "render fails", "stdin not JSON"])
def test_render_never_prints_a_traceback(tmp_path: Path, case: str) -> None:
    """Each bad input to `relay render` is one clear message and exit 1, not a traceback."""
    path = write_config(tmp_path, destinations=bad_render_destinations())
    event_file = tmp_path / "event.json"
    destination, stdin = "crm", b""
    if case == "invalid JSON":
        event_file.write_text("{not json")
    elif case == "invalid event":
        event_file.write_text(json.dumps({"channel": "pigeon"}))
    else:
        event_file.write_text(json.dumps(event(1, attributes={"host": "evil.example.com"})))
    if case == "missing file":
        event_file = tmp_path / "absent.json"
    if case == "unknown destination":
        destination = "nope"
    if case == "render fails":
        destination = "elsewhere"
    arg = str(event_file)
    if case == "stdin not JSON":
        arg, stdin = "-", b"\xff\xfe junk"
    done = run_relay("render", "-c", str(path), "--destination", destination, arg, stdin=stdin)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip()


@pytest.mark.parametrize("case", ["unknown destination", "render fails", "unreachable",
                                  "bad config"])
def test_test_command_never_prints_a_traceback(tmp_path: Path, case: str) -> None:
    """`relay test` with an unknown destination, a destination whose render fails, one that
    cannot be reached or a config with a public key as JWT key exits 1 without a traceback."""
    dests = bad_render_destinations()
    if case == "bad config":
        dests.append(jwt_dest("jwt", "ES256", public_pem(P256)))
    path = write_config(tmp_path, destinations=dests)
    name = {"unknown destination": "nope", "render fails": "elsewhere",
            "unreachable": "crm", "bad config": "jwt"}[case]
    done = run_relay("test", "-c", str(path), name)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr + done.stdout
    assert (done.stderr + done.stdout).strip()


async def test_reuse_false_sends_a_fresh_jti_per_delivery(make_stack: Any,
                                                          receiver: Any) -> None:
    """Delivered through the real dispatcher to a real receiver, two deliveries of a
    destination with auth.reuse false carry different jti; with the default they share one."""
    from tests.receiver import receiver_config

    def fresh(name: str, reuse: bool) -> dict[str, Any]:
        return {"name": name, "format": "braze", "url": f"{receiver.url}/{name}",
                "auth": {"type": "jwt", "algorithm": "HS256", "key": "k" * 32, "reuse": reuse}}

    stack = await make_stack(**receiver_config(
        receiver, destinations=[fresh("fresh", False), fresh("cached", True)]))
    await stack.post(event(1), event(2))
    got = await receiver.await_for(4)

    def jtis(prefix: str) -> set[str]:
        return {jwt.decode(r.headers["Authorization"].split()[1], "k" * 32,
                           algorithms=["HS256"])["jti"] for r in got if r.path.startswith(prefix)}

    assert len(jtis("/fresh")) == 2
    assert len(jtis("/cached")) == 1
