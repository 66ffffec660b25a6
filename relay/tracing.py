"""OpenTelemetry tracing, when the ``relay[otel]`` extra is installed and configured.

The only module that imports ``opentelemetry``, and only if it is there: without the extra
nothing is imported and every function here is a cheap no-op. Configured by the standard
environment variables: the SDK is set up when ``OTEL_TRACES_EXPORTER``,
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (exporter
``otlp`` over HTTP by default, ``console`` or ``none``), not when ``OTEL_SDK_DISABLED=true``;
``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` are the SDK's own. A tracer
provider set globally by someone else (``opentelemetry-instrument``) is used as it is.

What it traces: the sender's ``traceparent`` on ingest is kept with the event
(``incoming``), each delivery attempt is a CLIENT span in that trace (``attempt``), and the
request to the destination carries the attempt span's ``traceparent``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from relay.request import Exchange, Request

try:  # the optional extra
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised by the plain install
    _trace = None  # type: ignore[assignment]
    _propagate = None  # type: ignore[assignment]

TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_UNSET: Any = object()
_tracer: Any = _UNSET


def use(provider: Any) -> None:
    """Trace with ``provider`` (tests: an SDK provider with an in-memory exporter); None: off."""
    global _tracer
    _tracer = None if provider is None or _trace is None else provider.get_tracer("relay")


def _from_env() -> Any:
    """The tracer the OTEL_* environment asks for, or None."""
    if _trace is None or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    current = _trace.get_tracer_provider()
    if not isinstance(current, _trace.ProxyTracerProvider):
        return current.get_tracer("relay")  # set up by someone else
    if not any(os.environ.get(name) for name in (
            "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "relay")}))
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip()
    exporter: Any = None
    if kind == "console":
        exporter = ConsoleSpanExporter()
    elif kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _trace.set_tracer_provider(provider)
    return provider.get_tracer("relay")


def tracer() -> Any:
    """The relay's tracer, set up from the environment on first use; None when tracing is
    off. An OTEL_* value the SDK refuses turns tracing off with one error line: tracing is
    never worth an ingest or a delivery (relay/service.py asks at start-up, so the line comes
    then)."""
    global _tracer
    if _tracer is _UNSET:
        try:
            _tracer = _from_env()
        except Exception as exc:
            _tracer = None
            logging.getLogger("relay.tracing").error(
                "tracing is off: OpenTelemetry could not be set up from the OTEL_* environment "
                "variables (%s: %s)", type(exc).__name__, exc)
    return _tracer


def enabled() -> bool:
    return tracer() is not None


def incoming(headers: Mapping[str, str]) -> str | None:
    """The ingest request's ``traceparent`` to keep with its events (None when tracing is off
    or the header is absent or malformed)."""
    value = headers.get("traceparent")
    if value is None or not enabled():  # (the header first: most requests carry none)
        return None
    value = value.strip().lower()
    return value if TRACEPARENT.fullmatch(value) and value[:2] != "ff" else None


class _Span:
    """One attempt's span: ``request`` carries its traceparent; ``finish`` records the result."""

    __slots__ = ("request", "span")

    def __init__(self, request: Request, span: Any = None) -> None:
        self.request, self.span = request, span

    def finish(self, exchange: Exchange, outcome: str) -> None:
        span = self.span
        if span is None:
            return
        span.set_attribute("relay.outcome", outcome)
        if exchange.status is not None:
            span.set_attribute("http.response.status_code", exchange.status)
        if exchange.error is not None:
            span.set_attribute("error.type", exchange.error)
        if outcome != "delivered":
            span.set_status(_trace.Status(_trace.StatusCode.ERROR,
                                          exchange.error_text or f"HTTP {exchange.status}"))
        span.end()


def attempt(request: Request, destination: str, host: str, number: int) -> _Span:
    """Start the span of one delivery attempt, a child of the event's trace (the request's
    ``traceparent`` as stored at ingest) or a new trace; end it with ``finish``."""
    tr = tracer()
    if tr is None:
        return _Span(request)
    parent = request.headers.get("traceparent")
    context = _propagate.extract({"traceparent": parent}) if parent else None
    span = tr.start_span("relay deliver", context=context, kind=_trace.SpanKind.CLIENT,
                         attributes={"relay.destination": destination, "server.address": host,
                                     "relay.attempt": number,
                                     "http.request.method": request.method})
    carrier: dict[str, str] = {}
    _propagate.inject(carrier, context=_trace.set_span_in_context(span))
    return _Span(request.with_headers(**carrier) if carrier else request, span)
