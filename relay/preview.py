"""Showing requests to people: ``relay render`` and the test-send answer.

Runs the same steps as delivery (accept, route, render, sign) for one destination, without
sending, and formats the result as an HTTP request and a curl command with secrets masked.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable

from relay.auth import destination_secrets, mask
from relay.config.lint import json_raw_bodies
from relay.destinations import Loaded
from relay.errors import InvalidEvent, RenderError
from relay.events import accept, load_event, parse_events
from relay.ids import delivery_id
from relay.request import Request
from relay.routing import Router
from relay.testsend import controls, synthetic_event
from relay.tracing import TRACEPARENT


def preview(loaded: Loaded, destination: str, raw_event: bytes) -> tuple[str, bool]:
    """(text to print, True when a request was rendered or the event would be skipped)."""
    config, target = loaded.config, loaded.destinations.get(destination)
    if target is None:
        names = ", ".join(d.name for d in config.destinations) or "none configured"
        return f"relay render: no destination {destination!r} (destinations: {names})", False
    raw_event, traceparent = _stored_trace(raw_event)
    try:
        events, _ = parse_events(raw_event, 1)
    except InvalidEvent as exc:
        return "relay render: " + exc.render(), False
    event = events[0]
    if traceparent is not None:
        event = event.model_copy(update={"traceparent": traceparent})
    accepted = accept(event, time.time())
    event = load_event(accepted.body)
    dest = target.destination
    route = next((r for r in Router(config).route(accepted) if r.destination == dest.name),
                 None)
    if route is None:
        return (f"not sent: destination {dest.name} does not take {event.channel} "
                f"events with status {event.status!r} (see its channels, statuses"
                f"{', org/sandbox' if dest.format == 'ajo' else ''})"), True
    if route.state == "skipped":
        return f"skipped: {route.reason}", True
    did = delivery_id(time.time())
    try:
        request = target.request(event, did)
    except RenderError as exc:
        return f"would fail without sending: {exc}", False
    signed = mask(request, destination_secrets(dest))
    notes = "".join(f"# {key}: {json.dumps(value) if isinstance(value, dict) else value}\n"
                    for key, value in controls(target).items())
    return (f"# {dest.name} ({dest.format}), delivery {did}; secrets masked\n{notes}"
            f"{as_http(signed)}\n\n# the same as curl:\n{as_curl(signed)}"), True


def json_body_warnings(loaded: Loaded, warned: Iterable[str] = ()) -> list[tuple[str, str]]:
    """``(path, message)`` for each raw template body sent as JSON that does not render to
    JSON for a sample event (``relay test``'s, in each variant's language): a missing comma
    or quote, found now rather than from every receiver's 400. Not for the paths in
    ``warned``: those ``relay.config.lint`` warns about already (an output without ``json``
    breaks the body for some events; that warning says how to fix both)."""
    skip = set(warned)
    found: list[tuple[str, str]] = []
    for dest, path, language, _ in json_raw_bodies(loaded.config):
        target = loaded.destinations.get(dest.name)
        if path in skip or target is None:
            continue
        event = synthetic_event(dest).model_copy(update={"language": language})
        try:
            json.loads(target.request(event, delivery_id(time.time())).body)
        except RenderError as exc:
            found.append((path, f"does not render for a sample event ({exc}); "
                                f"relay render shows it"))
        except ValueError as exc:
            found.append((path, f"is sent as JSON but renders to something else for a "
                                f"sample event ({exc}); relay render shows it"))
    return found


def _stored_trace(raw_event: bytes) -> tuple[bytes, str | None]:
    """An event as the relay stored it may carry ``traceparent``, the relay's own record of
    its ingest request's header (refused in a posted event): taken out here, so an event
    copied from the spool renders as its deliveries do. Any other form of the field is left
    for parse_events to refuse."""
    if b'"traceparent"' not in raw_event:
        return raw_event, None
    try:
        event = json.loads(raw_event)
    except ValueError:
        return raw_event, None
    value = event.get("traceparent") if isinstance(event, dict) else None
    if not isinstance(value, str) or not TRACEPARENT.fullmatch(value):
        return raw_event, None
    del event["traceparent"]
    return json.dumps(event).encode(), value


def as_http(request: Request) -> str:
    lines = [f"{request.method} {request.url}"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    body = request.body.decode("utf-8", errors="replace")
    return "\n".join(lines) + ("\n\n" + body if body else "")


def as_curl(request: Request) -> str:
    lines = [f"curl -X {request.method} {shlex.quote(request.url)}"]
    lines += [f"-H {shlex.quote(f'{name}: {value}')}" for name, value in request.headers.items()]
    if request.body:
        lines.append(f"--data-binary {shlex.quote(request.body.decode('utf-8', errors='replace'))}")
    return " \\\n  ".join(lines)
