"""Turn pydantic's validation errors into (path, message) pairs a person can act on.

Shared by config loading (paths such as ``destinations[1].auth.key``) and event ingest (JSON
paths such as ``[3].channel``). Owns wording only; it never decides what is valid.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pydantic


def problems_from(
    exc: pydantic.ValidationError,
    data: Any = None,
    *,
    noun: str = "key",
    known: Iterable[str] | Mapping[str, tuple[str, ...]] = (),
    limit: int = 100,
) -> list[tuple[str, str]]:
    """``(path, message)`` for each error; ``data`` lets union tags be dropped from paths."""
    errors = exc.errors(include_url=False)
    return problems_of(errors, len(errors), data, noun=noun, known=known, limit=limit)


def problems_of(
    errors: Sequence[Any],
    total: int,
    data: Any = None,
    *,
    noun: str = "key",
    known: Iterable[str] | Mapping[str, tuple[str, ...]] = (),
    limit: int = 100,
) -> list[tuple[str, str]]:
    """``problems_from`` over the first of ``total`` errors (pydantic's ``ErrorDetails``)."""
    problems = [describe(err, loc_to_path(err["loc"], data), noun, known,
                         secret=is_secret_location(err["loc"]))
                for err in errors[:limit]]
    if total > limit:
        problems.append(("", f"... and {total - limit} more problems"))
    return problems


def loc_to_path(loc: tuple[Any, ...], data: Any = None) -> str:
    """``("destinations", 1, "url")`` -> ``destinations[1].url``; ``(3, "channel")`` -> ``[3].channel``.

    pydantic puts the tag of a discriminated union into the location (``auth.jwt.key``); when
    the input at that point is a mapping whose ``type`` is that tag, the tag is skipped.
    """
    path, node = "", data
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
        elif isinstance(node, dict) and part not in node and node.get("type") == part:
            continue
        else:
            path = join(path, part)
            node = node.get(part) if isinstance(node, dict) else None
    return path


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# A key naming a secret (``token``, ``password``, ``api_key``, ``dsn``...): the value given for
# it is never repeated in a message, whatever its type (a numeric token is still a token).
_SECRET_KEY = re.compile(r"token|password|passwd|secret|key|dsn|credential", re.IGNORECASE)
_NOT_SECRET_KEYS = frozenset({"key_id"})
# Every value under these keys is treated as secret: JWT claims, and header values (which
# ``relay.auth`` masks too, unless the header is on its public list).
_SECRET_CONTAINERS = frozenset({"claims", "headers"})


def is_secret_location(loc: Iterable[Any]) -> bool:
    """True when a validation error's location is, or is inside, a secret-holding key."""
    for part in loc:
        if not isinstance(part, str):
            continue
        if part in _SECRET_CONTAINERS:
            return True
        if part not in _NOT_SECRET_KEYS and _SECRET_KEY.search(part):
            return True
    return False


def describe(err: Any, path: str, noun: str = "key",
             known: Iterable[str] | Mapping[str, tuple[str, ...]] = (),
             secret: bool = False) -> tuple[str, str]:
    """One error as (path, message); with ``secret`` the input value is never shown."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if secret:
        got = None
    if kind == "extra_forbidden":
        return path, f"unknown {noun}" + suggest(path.rsplit(".", 1)[-1], known, path)
    if kind == "missing":
        return path, f"required {noun} is missing"
    if kind == "union_tag_not_found":
        return join(path, "type"), f"required {noun} is missing"
    if kind == "union_tag_invalid":
        return join(path, "type"), f"must be one of {ctx.get('expected_tags')} (got {ctx.get('tag')!r})"
    if kind == "literal_error":
        return path, f"must be one of {ctx.get('expected')}" + \
            (f" (got {_short(got)})" if got is not None else "")
    if kind == "value_error":
        return path, str(ctx.get("error", err["msg"]))
    if kind == "too_long" and "max_length" in ctx:  # a list (or mapping) with too many items
        return path, f"holds at most {ctx['max_length']:,} items (got {ctx.get('actual_length')})"
    if kind == "json_invalid":
        return path, f"not valid JSON: {ctx.get('error', err['msg'])}"
    # pydantic's words for Python types, in the words of the YAML or JSON that was written
    message = (_PLAIN_TYPES.get(kind) if noun == "key" else None) or \
        err["msg"][0].lower() + err["msg"][1:]   # (a config's keys; the API keeps pydantic's)
    if got is not None and not isinstance(got, dict | list):
        message += f" (got {_short(got)})"
    return path, message


_PLAIN_TYPES = {
    "tuple_type": "expected a list", "list_type": "expected a list",
    "dict_type": "expected a mapping (key: value pairs)",
    "model_type": "expected a mapping (key: value pairs)",
    "model_attributes_type": "expected a mapping (key: value pairs)",
    "int_parsing": "expected a whole number", "int_type": "expected a whole number",
    "float_parsing": "expected a number", "float_type": "expected a number",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "string_type": "expected text",
}


def suggest(key: str, known: Iterable[str] | Mapping[str, tuple[str, ...]], path: str = "") -> str:
    """A hint for an unknown key: where it belongs when ``known`` maps keys to the sections
    that hold them (``; timeout belongs under delivery or a destination``), else the closest
    known key (`` (did you mean 'timeout'?)``)."""
    if isinstance(known, Mapping) and key in known:
        section = _section_of(path)
        homes = [where for where in known[key] if where != section]
        if homes:
            return f"; {key} belongs under {' or '.join(homes)}"
    others = [k for k in known if k != key]
    # two letters swapped: difflib rates a short key too far from its own (dns/dsn: 0.67)
    close = [k for k in others if len(k) == len(key) and sorted(k) == sorted(key)
             and sum(a != b for a, b in zip(k, key, strict=True)) == 2][:1] \
        or difflib.get_close_matches(key, others, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_of(path: str) -> str:
    """``server.timeout`` -> ``server``; ``destinations[0].x`` -> ``a destination``."""
    parent = path.rpartition(".")[0]
    if not parent:
        return "the top level"
    if re.fullmatch(r"destinations\[\d+\]", parent):
        return "a destination"
    return parent


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
