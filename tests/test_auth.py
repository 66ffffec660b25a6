"""Signing: JWT verified by pyjwt, HMAC verified by the standardwebhooks package, masking."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from relay.auth import USER_AGENT, Signing, mask
from relay.config import Destination, parse_config
from relay.destinations import compile_destinations
from relay.errors import ConfigError
from relay.request import Request
from tests.helpers import Clock

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_" + base64.b64encode(b"an older secret for rotation!").decode()
REQUEST = Request("POST", "https://h.example.com/x", {"Content-Type": "application/json"},
                  b'{"a":1}')


def dest(auth: dict[str, Any], **extra: Any) -> Destination:
    entry = {"name": "d", "format": "braze", "url": "https://h.example.com/x", "auth": auth, **extra}
    return parse_config(json.dumps({"destinations": [entry]}), env={}).destinations[0]


def pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def test_every_request_has_webhook_id_and_user_agent() -> None:
    """Webhook-Id is the delivery id and User-Agent names the relay, with no auth at all."""
    signed = Signing(dest({"type": "none"})).sign(REQUEST, "dlv_1")
    assert signed.headers["Webhook-Id"] == "dlv_1"
    assert signed.headers["User-Agent"] == USER_AGENT and "relay/" in USER_AGENT
    assert signed.body == REQUEST.body and "Authorization" not in signed.headers


def test_signing_replaces_its_headers_whatever_their_case_and_keeps_the_rest() -> None:
    """A rendered request may carry the names signing sets (from destination headers, in any
    case): each is sent once, with signing's value; the others keep their values and order,
    and the request's body and egress options are kept."""
    via = object()
    rendered = Request("POST", "https://h.example.com/x",
                       {"X-First": "1", "user-agent": "mine", "WEBHOOK-ID": "theirs",
                        "authorization": "Bearer old", "X-Last": "2"}, b"{}", via)
    signed = Signing(dest({"type": "bearer", "token": "t0k"})).sign(rendered, "dlv_9")
    assert list(signed.headers.items()) == [
        ("X-First", "1"), ("X-Last", "2"), ("Webhook-Id", "dlv_9"), ("User-Agent", USER_AGENT),
        ("Authorization", "Bearer t0k")]
    assert signed.body == b"{}" and signed.via is via
    assert rendered.headers["user-agent"] == "mine"   # the rendered request is not changed


def test_bearer_and_basic() -> None:
    """bearer sends the token, basic sends base64(username:password)."""
    bearer = Signing(dest({"type": "bearer", "token": "t0k"})).sign(REQUEST, "d")
    assert bearer.headers["Authorization"] == "Bearer t0k"
    basic = Signing(dest({"type": "basic", "username": "u", "password": "p:w"})).sign(REQUEST, "d")
    assert basic.headers["Authorization"] == "Basic " + base64.b64encode(b"u:p:w").decode()


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA"])
def test_jwt_verifies_with_pyjwt(algorithm: str) -> None:
    """Tokens verify on the receiving side with the matching key, with every documented claim."""
    if algorithm.startswith("HS"):
        private = public = "a-shared-secret-that-is-long-enough-for-hs512-0123456789abcdef-xyz"
    else:
        key = {"RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
               "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
               "EdDSA": ed25519.Ed25519PrivateKey.generate}[algorithm]()
        private, public = pem(key), key.public_key()
    clock = Clock(1_700_000_000.0)
    signing = Signing(dest({"type": "jwt", "algorithm": algorithm, "key": private,
                            "issuer": "relay", "subject": "feedback", "audience": "ajo",
                            "ttl": "5m", "claims": {"tenant": "t1"}, "key_id": "k1"}), clock)
    header = signing.sign(REQUEST, "d").headers["Authorization"]
    assert header.startswith("Bearer ")
    token = header.removeprefix("Bearer ")
    claims = jwt.decode(token, public, algorithms=[algorithm], audience="ajo", issuer="relay",
                        options={"verify_exp": False})
    assert claims["sub"] == "feedback" and claims["tenant"] == "t1"
    assert claims["exp"] - claims["iat"] == 300 and claims["iat"] == int(clock.now)
    assert len(claims["jti"]) == 32
    assert jwt.get_unverified_header(token)["kid"] == "k1"


def test_jwt_is_cached_until_60s_before_expiry() -> None:
    """The same token is reused until 60 s before exp, then a fresh one (new jti) is minted."""
    clock = Clock(1_700_000_000.0)
    signing = Signing(dest({"type": "jwt", "key": "k" * 32, "ttl": "5m"}), clock)
    first = signing.sign(REQUEST, "a").headers["Authorization"]
    clock.now += 239
    assert signing.sign(REQUEST, "b").headers["Authorization"] == first
    clock.now += 2  # 241 s: inside the last minute of a 300 s token
    second = signing.sign(REQUEST, "c").headers["Authorization"]
    assert second != first
    decode = lambda t: jwt.decode(t.split()[1], "k" * 32, algorithms=["HS256"],  # noqa: E731
                                  options={"verify_exp": False})
    assert decode(first)["jti"] != decode(second)["jti"]


def test_jwt_header_and_scheme_are_configurable() -> None:
    """header and scheme change where and how the token is sent; an empty scheme sends it bare."""
    signed = Signing(dest({"type": "jwt", "key": "k" * 32, "header": "X-Token",
                           "scheme": ""})).sign(REQUEST, "d")
    assert "Authorization" not in signed.headers
    jwt.decode(signed.headers["X-Token"], "k" * 32, algorithms=["HS256"])


def test_hmac_verifies_with_standardwebhooks() -> None:
    """Standard Webhooks signatures verify with the reference library, for every rotated secret."""
    signing = Signing(dest({"type": "hmac", "secrets": [SECRET, OLD_SECRET]}))
    signed = signing.sign(REQUEST, "dlv_42")
    assert signed.headers["webhook-id"] == "dlv_42"
    assert len(signed.headers["webhook-signature"].split()) == 2
    for secret in (SECRET, OLD_SECRET):
        payload = Webhook(secret).verify(signed.body.decode(), signed.headers)
        assert payload == {"a": 1}
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"wrong").decode()).verify(
            signed.body.decode(), signed.headers)


def test_bad_keys_are_config_errors() -> None:
    """A PEM that does not parse, or a whsec_ secret that is not base64, fails at load."""
    with pytest.raises(ConfigError) as info:
        compile_destinations(parse_config(json.dumps({"destinations": [
            {"name": "a", "format": "braze", "url": "https://h/",
             "auth": {"type": "jwt", "algorithm": "RS256", "key": "not a pem"}},
            {"name": "b", "format": "braze", "url": "https://h/",
             "auth": {"type": "hmac", "secret": "whsec_%%%"}},
            {"name": "c", "format": "braze", "url": "https://h/",
             "auth": {"type": "jwt", "algorithm": "HS384", "key": "short"}}]}), env={}))
    found = dict(info.value.problems)
    assert "at least 48 bytes" in found["destinations[2].auth.key"]
    assert "RS256" in found["destinations[0].auth.key"]
    assert "base64" in found["destinations[1].auth.secret"]


def test_mask_hides_secrets_but_keeps_shape() -> None:
    """Masking hides tokens, signatures and every header not on the public list, keeping
    scheme words and public headers such as Content-Type."""
    request = Request("POST", "https://h/", {"Authorization": "Bearer abc", "X-Api-Key": "k",
                                             "webhook-signature": "v1,AAA v1,BBB",
                                             "X-Env": "prod", "Content-Type": "text/plain"})
    masked = mask(request).headers
    assert masked == {"Authorization": "Bearer ****", "X-Api-Key": "****",
                      "webhook-signature": "v1,**** v1,****", "X-Env": "****",
                      "Content-Type": "text/plain"}
