"""The config's field types: durations, names, ports, header names and values, host names,
file paths, each with the validator that gives a bad value its message. The sections that use
them are ``relay.config.schema``'s.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr

from relay.request import has_markup

# ---------------------------------------------------------------------------------------------
# Scalar types

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
MAX_DESTINATIONS = 65_536  # relay/spool/delivery_ids.py: deliveries per event an id tells apart


MAX_DURATION = 3650 * 86400.0   # ten years: any longer is a typo


def parse_duration(value: Any) -> float:
    """``"90s"`` -> 90.0; also ``100ms``, ``30m``, ``24h``, ``7d`` and sums such as ``1h30m``."""
    hint = "expected a duration such as '100ms', '90s', '30m', '24h' or '7d'"
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"{hint} (got {value!r}; a bare number has no unit)")
    text = value.strip()
    if not _DURATION_FULL.fullmatch(text):
        raise ValueError(f"{hint} (got {value!r})")
    seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    if seconds > MAX_DURATION:
        # (a retry or retention past this writes times no API answer can show: year 275 million)
        raise ValueError(f"at most 3650d (ten years) (got {value!r})")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
def _not_a_boolean(value: Any) -> Any:
    # pydantic's lax mode reads true as 1 (`max_retries: yes` would be 1 retry); a number
    # from ${VAR} is text and stays welcome
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not {str(value).lower()}")
    return value


NOT_BOOL = BeforeValidator(_not_a_boolean)


def _not_empty_secret(value: SecretStr) -> SecretStr:
    # (an empty token is sent as "Bearer " and counted delivered; an empty password or client
    # secret fails every request)
    if not value.get_secret_value().strip():
        raise ValueError("must not be empty")
    return value


RequiredSecret = Annotated[SecretStr, AfterValidator(_not_empty_secret)]
Port = Annotated[int, NOT_BOOL, Field(ge=1, le=65535)]
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")   # an HTTP field name (RFC 9110 token)


def _header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"not an HTTP header name (letters, digits and !#$%&'*+.^_`|~- only; "
                         f"got {value!r})")
    return value


def header_text(value: str) -> str:
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("a header value cannot hold a line break or NUL")
    return value


def _header_value(value: str) -> str:
    # (a Liquid value is checked once rendered, before each request)
    return value if has_markup(value) else header_text(value)


def header_secret(value: SecretStr) -> SecretStr:
    # An auth secret goes into a header (in basic, encoded: the receiver would compare a
    # password with a line break in it): a trailing newline from ${VAR} failed every delivery
    # with "Forbidden control character". (A *_file's trailing newline is stripped.)
    try:
        header_text(value.get_secret_value())
    except ValueError:
        raise ValueError("cannot hold a line break or NUL: it is sent in a header (an "
                         "environment variable with a trailing newline?)") from None
    return value


def _file_path(value: str) -> str:
    # (the OS cannot open it: opening it was an "embedded null byte" ValueError traceback)
    if "\x00" in value:
        raise ValueError(f"a file path cannot hold a NUL byte (got {value!r})")
    return value


FilePath = Annotated[str, AfterValidator(_file_path)]


def json_claims(value: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"claims must be JSON values: strings, numbers, booleans, lists and "
                         f"mappings (quote a date: '2024-01-01'); {exc}") from None
    return value


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")   # of a DNS name, in ASCII (xn--)


def is_host_name(host: str) -> bool:
    """A DNS name (labels of 1-63 letters, digits, - and _; non-ASCII ones as IDNA can write
    them) or an IP literal: what a URL's host can be."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host.removesuffix(".")
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return False
    labels = name.split(".")
    # (all digits is the dotted-decimal form, never a name: RFC 1123, 2.1; "999.1.1.1")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels) \
        and not all(label.isdigit() for label in labels)


def _port_text(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def allowed_host(entry: str) -> str:
    # (relay.request.split_host_port reads it; what it cannot split is kept whole as a "host"
    # that no rendered URL's host ever equals, and every delivery failed)
    text = entry.strip()
    if text.startswith("["):
        inner, _, rest = text[1:].partition("]")
        ok = ":" in inner and is_host_name(inner) and (
            rest == "" or (rest.startswith(":") and _port_text(rest[1:])))
    elif text.count(":") > 1:
        ok = is_host_name(text)   # a bare IPv6 literal
    else:
        host, sep, port = text.partition(":")
        ok = is_host_name(host) and (not sep or _port_text(port))
    if not ok:
        raise ValueError(f"expected \"host\" or \"host:port\" (crm.example.com, "
                         f"crm.example.com:8443, [::1]:443): no scheme, path, userinfo or "
                         f"wildcard (got {entry!r})")
    return entry


HeaderName = Annotated[str, AfterValidator(_header_name)]
# Headers the HTTP client frames every request with (no configuration may set them), and
# every header the relay sets itself: a credential written to one of them (auth.header)
# replaced it, shown unmasked by relay render for the public ones, or broke every request.
FRAMING_HEADERS = ("Host", "Content-Length", "Transfer-Encoding", "Connection")
RELAY_HEADERS = ("Content-Type", "User-Agent", "Webhook-Id", *FRAMING_HEADERS)
# (Webhook-Signature and -Timestamp are hmac's: a jwt or oauth2 credential may go there)


def _auth_header(value: str) -> str:
    if value.lower() in {name.lower() for name in RELAY_HEADERS}:
        raise ValueError(f"{value} is a header the relay sets or that frames the request; "
                         "send the credential in Authorization (the default) or a header of "
                         "the receiver's own, such as X-Api-Token")
    return value


AuthHeader = Annotated[HeaderName, AfterValidator(_auth_header)]
HeaderValue = Annotated[str, AfterValidator(_header_value)]
HeaderSecret = Annotated[SecretStr, AfterValidator(header_secret)]


def one_per_case(what: str, rule: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A validator of a mapping whose keys must differ in more than case: header names (X-Env
    and x-env were both sent, and the receiver saw two values), language tags (of fr and FR,
    one replaced the other)."""
    def check(mapping: dict[str, Any]) -> dict[str, Any]:
        seen: dict[str, str] = {}
        for key in mapping:
            first = seen.setdefault(key.lower(), key)
            if first != key:
                raise ValueError(f"{first!r} and {key!r} are the same {what} ({rule}): keep one")
        return mapping
    return check


Headers = Annotated[dict[HeaderName, HeaderValue], AfterValidator(one_per_case(
    "header", "names are compared without regard to case"))]
