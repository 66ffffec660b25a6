"""The local event senders post, its validation, and its normal form before it is stored.

Owns the ``Event`` schema (README "The local event") and the JSON paths named in 400s. It
fills what the relay must fix once per event (``id``, ``request_id``, ``occurred_at``) so that
every retry renders the same values. It never touches disk or the network.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, NamedTuple

import msgspec
import pydantic
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import ErrorDetails, from_json

from relay import ids
from relay.errors import InvalidEvent
from relay.validation import problems_of
from relay.vocab import Channel, Status

Text = Annotated[str, Field(min_length=1, max_length=2048)]
Ident = Annotated[str, Field(min_length=1, max_length=256)]


def _code_as_text(value: Any) -> Any:
    # AJO sends failure codes as strings ("25"); senders often have them as numbers.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# Every payload writes its times in UTC: one that is not there (9999-12-31T23:59-14:00) failed
# every attempt to render it. Bounds, not a validator function: compared in pydantic-core, they
# cost nothing where a Python validator made reading a stored event 45 % slower (4.0 -> 5.7 us).
# (A unix time in a string, "1700000000", is read as that time, as pydantic reads it.)
Moment = Annotated[AwareDatetime, Field(ge=datetime(1, 1, 2, tzinfo=UTC),
                                        le=datetime(9999, 12, 30, tzinfo=UTC))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Recipient(_Strict):
    email: Text | None = None
    phone: Text | None = None

    @model_validator(mode="after")
    def _one_identity(self) -> Recipient:
        if (self.email is None) == (self.phone is None):
            raise ValueError("give exactly one of email or phone")
        return self


class Failure(_Strict):
    """AJO ``messageFailure`` (category, type, code, reason) or ``messageExclusion`` (code,
    reason, details); ``reason`` is also Braze's ``metadata.reason``."""

    category: Text | None = None
    type: Text | None = None
    code: Annotated[Text | None, BeforeValidator(_code_as_text)] = None
    reason: Text | None = None
    details: Text | None = None


class Timestamps(_Strict):
    """Braze's extra timestamps on ``sent``."""

    received_at: Moment | None = None
    enqueued_at: Moment | None = None
    executed_at: Moment | None = None
    sent_at: Moment | None = None


# The sender's id is its own column (the dedupe key), and PostgreSQL's text cannot hold NUL:
# an id with one was a 503 the sender retried for good
EventId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00]*$")]


class Event(_Strict):
    id: EventId | None = None
    channel: Channel
    status: Status
    message_id: Ident
    occurred_at: Moment | None = None
    request_id: Ident | None = None
    message_type: Ident = "transactional"
    campaign_id: Ident | None = None
    campaign_version_id: Ident | None = None
    external_send_id: Ident | None = None
    recipient: Recipient | None = None
    failure: Failure | None = None
    retry_count: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    timestamps: Timestamps | None = None
    org: Ident | None = None
    sandbox: Ident | None = None
    language: Annotated[str, Field(min_length=1, max_length=35)] | None = None
    attributes: dict[str, Any] | None = None
    # W3C trace context of the ingest request, kept by the relay when tracing is on (relay.tracing)
    traceparent: Annotated[str, Field(pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")] \
        | None = None


EVENT_FIELDS = frozenset(Event.model_fields) | frozenset(Recipient.model_fields) \
    | frozenset(Failure.model_fields) | frozenset(Timestamps.model_fields)
_ONE = pydantic.TypeAdapter(Event)
# The validators themselves: TypeAdapter.validate_json and model_validate_json are Python
# wrappers that pass their defaults on (0.26 and 0.45 us per call of ~2.5).
_validate_one = _ONE.validator.validate_json
_validate_stored = Event.__pydantic_validator__.validate_json


MAX_PROBLEMS = 20  # problems listed in one 400; the rest are counted, not described


def parse_events(body: bytes, max_batch: int) -> tuple[list[Event], bool]:
    """Validate a request body: one event object or an array of events, all or nothing.

    Returns the events and whether the body was an array. Raises InvalidEvent with JSON paths
    such as ``[3].channel`` (array) or ``channel`` (single object), at most MAX_PROBLEMS of
    them. A batch's length is checked before its events (pydantic stops at ``max_batch`` + 1),
    and a body of more than FLOOD errors is described from its first ones (_flood_errors),
    so a hostile body costs about what validating it costs, not what describing every
    error would.
    """
    start = body[:1]
    if start not in (b"{", b"["):
        start = body.lstrip()[:1]
        if start not in (b"{", b"["):
            raise InvalidEvent([("", "the body must be one event (a JSON object) or an array "
                                     "of events")])
    try:
        events = [_validate_one(body)] if start == b"{" \
            else _batch(max_batch).validator.validate_json(body)
    except pydantic.ValidationError as exc:
        flood = exc.error_count() > FLOOD
        # A number that is not finite is named before other problems (no digit, N or I: none;
        # a flood of errors is decoded anyway, and looked at there)
        if not flood and _MAYBE_NUMBER.search(body) and _SUSPECT.search(body):
            _refuse_non_finite(body)
        errors = _flood_errors(body, start) if flood else None
        if not errors:
            errors = exc.errors(include_url=False)
        if errors[0]["type"] == "too_long" and errors[0]["loc"] == ():
            raise InvalidEvent([("", f"a batch holds at most {max_batch} events "
                                     f"(server.max_batch); this one has more")]) from None
        # a traceparent is refused as such whatever else is wrong, not checked as a value
        traced = _traced(body, start) if b"traceparent" in body else []
        kept = [err for err in errors if err["loc"][-1:] != ("traceparent",)] if traced \
            else errors
        raise InvalidEvent([(path, NO_TRACEPARENT) for path in traced] + problems_of(
            kept, exc.error_count() - (len(errors) - len(kept)), noun="field",
            known=EVENT_FIELDS, limit=MAX_PROBLEMS - len(traced))) from exc
    # A valid event can hold a number that is not finite only in ``attributes`` (every other
    # field is a string, a strict integer or a date): looking there is cheaper than scanning
    # the body for one (a regex over the text cost more than validating it).
    traced = []
    for index, event in enumerate(events):
        if event.attributes and not _all_finite(event.attributes):
            _refuse_non_finite(body)  # names each path; if it could not, say it plainly
            raise InvalidEvent([("attributes", "must hold only finite numbers (NaN, Infinity "
                                               "and numbers too large for a float are not JSON)")])
        if "traceparent" in event.model_fields_set:   # (null too)
            traced.append(f"[{index}].traceparent" if start == b"[" else "traceparent")
    if traced:
        raise InvalidEvent([(path, NO_TRACEPARENT) for path in traced[:MAX_PROBLEMS]])
    if start == b"[" and not events:
        raise InvalidEvent([("", "the array holds no events")])
    return events, start == b"["


# The event's traceparent field holds what the relay keeps of the request's traceparent
# header (relay.tracing): a sender setting it would choose every attempt's trace past the
# header's checks, and the contract lists no such field.
NO_TRACEPARENT = ("unknown field: send the trace context as the request's traceparent header "
                  "(docs/controls.md)")


def _traced(body: bytes, start: bytes) -> list[str]:
    """The paths of the events of an invalid body that have a traceparent field."""
    try:
        data = from_json(body)
    except ValueError:
        return []
    items = [data] if start == b"{" else data if isinstance(data, list) else []
    return [f"[{i}].traceparent" if start == b"[" else "traceparent"
            for i, item in enumerate(items)
            if isinstance(item, dict) and "traceparent" in item][:MAX_PROBLEMS]


FLOOD = 1_000   # errors in one body past which the first are found on a trimmed copy
_NESTED = frozenset({"recipient", "failure", "timestamps"})   # strict objects inside an event


def _flood_errors(body: bytes, start: bytes) -> list[ErrorDetails]:
    """The first MAX_PROBLEMS + 1 errors of a body with more than FLOOD, in the order pydantic
    gives them, found by validating each event again with all but the first of its unknown
    fields left out (none if the body cannot be decoded here). Building every error of a 1 MiB
    object of ~90,000 unknown fields took 0.2 s and 100 MB, and a refusal built them twice;
    the regex that looks for numbers that are not finite took 0.07 s over its digits
    (bench/abuse.py)."""
    try:   # (pydantic's own JSON parser: orjson read integers past 64 bits as floats, and
        data = from_json(body)   # an int code then looked invalid)
    except ValueError:
        return []
    if not _all_finite(data):
        _refuse_non_finite(body)
    found: list[ErrorDetails] = []
    for index, item in enumerate([data] if start == b"{" else data):
        try:
            _validate_one(json.dumps(_trimmed(item)))
        except pydantic.ValidationError as one:
            found += [err if start == b"{" else
                      ErrorDetails(**{**err, "loc": (index, *err["loc"])})
                      for err in one.errors(include_url=False)]
            if len(found) > MAX_PROBLEMS:
                break
    return found


def _trimmed(item: Any, nested: bool = True) -> Any:
    """An event object with its known fields and only its first MAX_PROBLEMS + 1 unknown ones
    (the same within recipient, failure and timestamps); anything else as it is."""
    if not isinstance(item, dict):
        return item
    kept: dict[str, Any] = {}
    unknown = 0
    for key, value in item.items():
        if key not in EVENT_FIELDS:
            unknown += 1
            if unknown > MAX_PROBLEMS + 1:
                continue
        kept[key] = _trimmed(value, False) if nested and key in _NESTED else value
    return kept


def _all_finite(node: Any) -> bool:
    """No float in ``node`` (decoded JSON: dicts, lists, scalars) is NaN or infinite."""
    todo = [node]
    while todo:
        node = todo.pop()
        if type(node) is dict:
            todo += node.values()
        elif type(node) is list:
            todo += node
        elif type(node) is float and not math.isfinite(node):
            return False
    return True


@functools.cache
def _batch(max_batch: int) -> pydantic.TypeAdapter[list[Event]]:
    return pydantic.TypeAdapter(Annotated[list[Event], Field(max_length=max_batch)])


# Where a number that is not finite could be: NaN, Infinity, an exponent, 300+ digits. Only an
# invalid body with one of these (rare: ``1e5`` in a string matches too) is decoded again.
_SUSPECT = re.compile(rb"NaN|Infinity|\d[eE][+-]?\d|\d{300}")
_MAYBE_NUMBER = re.compile(rb"[0-9NI]")  # 6x cheaper than _SUSPECT over a body with none


class _NonFinite(float):
    """A JSON number that is not a finite float (NaN, Infinity, 1e999), marked for its path."""


def _mark(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(value)


_decode_marking = json.JSONDecoder(parse_float=_mark, parse_constant=_mark).decode


def _refuse_non_finite(body: bytes) -> None:
    """400 at the path of every number that is not finite: Python's json (and pydantic) read
    NaN, Infinity and 1e999; JSON has none of them, and receivers may choke on them."""
    try:
        value = _decode_marking(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return  # not JSON at all: validation says so, with its own message
    paths = _non_finite_paths(value, "")
    if paths:
        raise InvalidEvent([(path, "must be a finite number (NaN, Infinity and numbers too "
                                   "large for a float are not JSON)")
                            for path in paths[:MAX_PROBLEMS]])


def _non_finite_paths(node: Any, path: str) -> list[str]:
    if isinstance(node, _NonFinite):
        return [path]
    if isinstance(node, dict):
        return [p for key, value in node.items()
                for p in _non_finite_paths(value, f"{path}.{key}" if path else str(key))]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in _non_finite_paths(value, f"{path}[{i}]")]
    return []


class Accepted(NamedTuple):
    """A valid event in its stored form, ready for routing and the spool. (A NamedTuple: it is
    made once per ingested event, and a frozen dataclass cost 5x more to build.)"""

    id: str
    sender_id: bool          # the sender chose the id: it is an idempotency key
    received_at: float       # unix seconds
    body: str                # the stored JSON, with id, request_id and occurred_at filled in
    channel: str
    status: str
    org: str | None
    sandbox: str | None
    event: Event | None = None  # the parsed event, when the caller had one at hand

    def to_json(self) -> str:
        return self.body


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_split = msgspec.json.Decoder(list[msgspec.Raw]).decode   # an array's elements, as bytes
_space = re.compile(r"[ \t\n\r]*")


def _skip(text: str, at: int = 0) -> re.Match[str]:
    """The run of JSON white space at ``at`` (possibly empty: it always matches)."""
    found = _space.match(text, at)
    assert found is not None
    return found


def accept_body(body: bytes, events: list[Event], received_at: float,
                traceparent: str | None = None) -> list[Accepted]:
    """The ingest fast path: store the sender's own JSON text for each event (already validated
    as ``events``), adding what must stay the same on every retry: ``id``, ``request_id``,
    ``occurred_at``.

    The added keys are spliced in before the object's closing brace, so an event is never
    re-encoded; when the key's name already appears in its text (say ``"request_id": null``),
    that event is decoded, filled and encoded instead, so no stored object has a key twice.
    The stored form reads back through the same validation (``load_event``).
    """
    text = body.decode()
    received = _iso_utc(received_at)
    pieces = [text] if len(events) == 1 and text[:1] == "{" and text[-1:] == "}" \
        else _objects(body, text, len(events))
    accepted = []
    for event, piece in zip(events, pieces, strict=True):
        sender_id = event.id is not None
        event_id = event.id if event.id is not None else ids.event_id()
        # The members to add, as JSON text (generated values are ASCII letters, digits and
        # ":-.+T"; a traceparent is validated hex and dashes: nothing to escape), and whether
        # one's name already appears in the event's text.
        added, clash = "", False
        if not sender_id:
            added, clash = f',"id":"{event_id}"', '"id"' in piece
        if event.request_id is None:
            added += f',"request_id":"{ids.request_id()}"'
            clash = clash or '"request_id"' in piece
        if event.occurred_at is None:
            added += f',"occurred_at":"{received}"'
            clash = clash or '"occurred_at"' in piece
        if traceparent is not None and event.traceparent is None:
            added += f',"traceparent":"{traceparent}"'
            clash = clash or '"traceparent"' in piece
        if clash:
            data = json.loads(piece)
            data.update(json.loads("{" + added[1:] + "}"))
            piece = _dumps(data)
        elif added:
            piece = piece[:-1] + added + "}"
        accepted.append(Accepted(event_id, sender_id, received_at, piece,
                                 event.channel, event.status, event.org, event.sandbox))
    return accepted


_second: tuple[int, str] = (-1, "")  # the last whole second formatted (one tuple: thread-safe)


def _iso_utc(ts: float) -> str:
    """``2026-11-23T10:00:00.123456+00:00``, as datetime.isoformat() writes it (but always with
    microseconds); the formatted second is reused (datetime with a tzinfo costs ~2 us)."""
    global _second
    second = int(ts)
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((ts - second) * 1_000_000):06d}+00:00"


def _objects(body: bytes, text: str, count: int) -> list[str]:
    """The text of each event in a validated body (``text`` is ``body`` decoded): the object
    itself, or each element of the array.

    msgspec finds the elements' bytes without building them (0.3 us an event of a batch of
    100, where json's scanner, which decodes each one to find where it ends, took 2.4: more
    than ``json.loads`` of the whole body). Should it disagree with validation about the
    body (it never has), json's scanner splits it as before."""
    start = _skip(text).end()
    if text[start] == "{":
        return [text[start:].rstrip()]
    try:
        raws = _split(body)
    except msgspec.MsgspecError:
        raws = []
    if len(raws) == count:
        return [str(raw, "utf-8") for raw in raws]
    pieces = []
    at = _skip(text, start + 1).end()
    for _ in range(count):
        _, end = _scan(text, at)
        pieces.append(text[at:end])
        at = _skip(text, _skip(text, end).end() + 1).end()  # past the comma
    return pieces


def accept(event: Event, received_at: float) -> Accepted:
    """Fill the values that must stay the same on every retry and render of this event."""
    update: dict[str, Any] = {}
    if event.id is None:
        update["id"] = ids.event_id()
    if event.request_id is None:
        update["request_id"] = ids.request_id()
    if event.occurred_at is None:
        update["occurred_at"] = datetime.fromtimestamp(received_at, UTC)
    if update:
        event = event.model_copy(update=update)
    assert event.id is not None
    return Accepted(event.id, "id" not in update, received_at,
                    event.model_dump_json(exclude_none=True), event.channel, event.status,
                    event.org, event.sandbox, event)


def load_event(stored: str | bytes) -> Event:
    """Read back an event the relay stored itself."""
    event: Event = _validate_stored(stored)
    return event
