"""Braze-style webhook campaigns: Liquid-templated URL, method, headers and body.

Templates are parsed once, when the renderer is built (``relay.liquid``, Braze's dialect);
syntax errors and unknown filters are config errors naming the destination and key. At render
time the context is ``event`` (the stored event, so ``event.attributes.order_id`` works),
``delivery_id`` and ``destination``. Missing values render empty, as in Braze, and the
``default`` filter supplies a fallback.

A rendered URL is checked as it will be sent: parsed and normalised with yarl (what aiohttp
sends with), http(s) only, no userinfo, no ``.``/``..`` path segments (an event value must not
climb out of the configured path), the static path prefix of the configured URL kept, the host
in ``allowed_hosts`` and the port allowed for that host (``allowed_ports``, default the
configured URL's own port) and in ``delivery.allowed_ports``. A header value with a control
character, a URL or header value over 8 KiB, a render error or a failed check raises
RenderError: the delivery fails with that reason and no request is sent. Reasons name the
scheme, host and port, never the whole rendered URL (it may carry secrets).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, get_args
from urllib.parse import unquote, urlsplit

from liquid import BoundTemplate
from pydantic import BaseModel
from yarl import URL

from relay.config import DeliveryConfig, Destination, JsonBody, RawBody
from relay.config.schema import Body
from relay.errors import ConfigError, RenderError
from relay.events import Event
from relay.liquid import ENV, LiquidError, parse, template_problems
from relay.payloads._json import dumps
from relay.request import (
    Request,
    has_markup,
    host_form,
    host_is_rendered,
    literal_head,
    merge_headers,
    split_host_port,
    templated_host_port,
)

MAX_URL = 8192           # bytes of a rendered URL
MAX_HEADER_VALUE = 8192  # bytes of one rendered header value
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # C0 controls but tab, and DEL
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Text:
    """A template without Liquid markup (no ``{{`` or ``{%``): what it renders to does not
    depend on the event, so it is rendered once, when compiled (a Liquid render costs 10-20 us
    per delivery even for plain text)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def render(self, **context: Any) -> str:
        return self.text


Template = BoundTemplate | Text


def _names(model: type[BaseModel]) -> dict[str, Any]:
    """A model's field names, each with its own model's names (None: any value below it)."""
    found: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        inner = next((t for t in (get_args(field.annotation) or (field.annotation,))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
        found[name] = _names(inner) if inner is not None else None
    return found


# What a template can name: the context render() gives. An event's fields are fixed; below
# ``attributes`` (the sender's own) anything goes. Liquid's size/first/last work on any value.
CONTEXT_NAMES: dict[str, Any] = {"event": _names(Event), "delivery_id": None,
                                 "destination": None}
_ANY_VALUE = frozenset({"size", "first", "last"})


def unknown_variables(template: BoundTemplate, source: str) -> list[str]:
    """Each variable a template names that the context cannot hold (``event.stauts``,
    ``evnt.status``): it would render empty for every event."""
    problems = []
    for uses in template.analyze(include_partials=False).globals.values():
        for use in uses:
            names, segments = CONTEXT_NAMES, use.segments
            for depth, segment in enumerate(segments):
                if names is None or not isinstance(segment, str) or segment in _ANY_VALUE:
                    break
                if segment not in names:
                    shown = ".".join(str(s) for s in segments[:depth + 1])
                    close = difflib.get_close_matches(segment, names, n=1)
                    owner = ".".join(map(str, segments[:depth])) or "the context"
                    line, col = use.span.line_col(source)
                    problems.append(f"unknown variable {shown!r} (line {line}, column {col + 1})"
                                    + (f": did you mean {close[0]!r}?" if close else
                                       f"; {owner} has {', '.join(sorted(names))}"))
                    break
                names = names[segment]
    return sorted(set(problems))


def compile_template(source: str, path: str, problems: list[tuple[str, str]]) -> Template:
    """Parse one template; each problem (syntax, unknown filter, a variable no event has) is
    added at ``path``."""
    found = template_problems(source)
    if found:
        problems.extend((path, f"Liquid: {message}" if message.startswith(("filter ", "tag "))
                         else f"Liquid syntax error: {message}") for message in found)
        return ENV.from_string("")
    template = parse(source)
    unknown = unknown_variables(template, source)
    if unknown:
        problems.extend((path, f"Liquid: {message}") for message in unknown)
        return ENV.from_string("")
    if "{{" not in source and "{%" not in source:
        return Text(template.render())   # as Liquid writes it (it turns \r into \n)
    return template


def static_path_prefix(url: str) -> str:
    """The path a templated URL keeps whatever the event: up to the last '/' before the first
    template (``https://h/crm/{{ id }}`` -> ``/crm/``); "" when the host is templated."""
    head, *templated = re.split(r"\{\{|\{%", url, maxsplit=1)
    if not templated:
        return ""
    path = urlsplit(head).path if "/" in head.partition("://")[2] else ""
    return path.rsplit("/", 1)[0] + "/" if path else ""


@dataclass(frozen=True, slots=True)
class _Compiled:
    url: Template
    path_prefix: str
    method: str
    headers: tuple[tuple[str, Template], ...]
    body: tuple[str, Any] | None          # ("json", ((key, template), ...)) | ("raw", template)
    content_type: str | None


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where a destination's rendered URLs may point: hosts, and ports per host."""

    outer: frozenset[int]                  # delivery.allowed_ports
    hosts: dict[str, frozenset[int]]       # host -> the ports it may be reached on

    @classmethod
    def of(cls, dest: Destination, delivery: DeliveryConfig) -> Endpoints:
        parts = urlsplit(literal_head(dest.url))
        netloc_static = not host_is_rendered(dest.url)
        try:
            own_port = parts.port if netloc_static else templated_host_port(dest.url)
        except ValueError:
            own_port = None
        default = own_port or _DEFAULT_PORTS.get(parts.scheme, 443)
        ports = frozenset(dest.allowed_ports) if dest.allowed_ports else frozenset({default})
        hosts: dict[str, frozenset[int]] = {}
        for entry in dest.allowed_hosts or [parts.hostname or ""]:
            host, port = split_host_port(entry)  # "host": the destination's ports; "host:port"
            host = host_form(host)   # (as check() sees a rendered host: else never matched)
            hosts[host] = hosts.get(host, frozenset()) | (ports if port is None else {port})
        return cls(frozenset(delivery.allowed_ports), hosts)

    def check(self, rendered: str, path_prefix: str = "") -> str:
        """The URL to send (normalised), or RenderError saying what is not allowed."""
        if len(rendered.encode()) > MAX_URL:
            raise RenderError(f"rendered url is longer than {MAX_URL} bytes")
        try:
            url = URL(rendered)
            scheme, host, port = url.scheme, (url.host or "").lower(), url.port
        except (ValueError, TypeError) as exc:
            raise RenderError(f"rendered url is not a valid URL ({exc})") from exc
        if scheme not in _DEFAULT_PORTS or not host:
            raise RenderError("rendered url is not an http(s) URL with a host")
        where = f"{scheme}://{host}:{port}"
        if url.user is not None or url.password is not None or "@" in (urlsplit(rendered).netloc):
            raise RenderError(f"rendered url for {where} carries userinfo (user:password@), "
                              "which is refused")
        raw_path = urlsplit(rendered).path
        # (decoded whole: "..%2Fadmin" is "../admin" to a receiver that decodes %2F)
        if any(segment in (".", "..") for segment in unquote(raw_path).split("/")):
            raise RenderError(f"rendered url for {where} has a '.' or '..' path segment")
        if host not in self.hosts:
            raise RenderError(f"rendered url host {host!r} is not in allowed_hosts "
                              f"({', '.join(sorted(self.hosts))})")
        if port not in self.hosts[host] or port not in self.outer:
            key = "delivery.allowed_ports" if port in self.hosts[host] else \
                "the destination's allowed_ports, or allowed_hosts as host:port"
            raise RenderError(f"rendered url port {port} for {host} is not allowed (see {key})")
        if path_prefix and not url.raw_path.startswith(path_prefix):
            raise RenderError(f"rendered url for {where} leaves the configured path "
                              f"{path_prefix!r}")
        return str(url)


def _static_endpoint(endpoints: Endpoints, url: str, at: str) -> list[tuple[str, str]]:
    """A url whose host and port are literal (a language variant's), against the rule every
    rendered url of the destination meets before it is sent: a port is allowed per host, by
    the destination's allowed_ports or its url's own port, not only by
    delivery.allowed_ports. (A variant on another port than the destination's url passed the
    config check, and every delivery in that language failed at send time.)"""
    if host_is_rendered(url):
        return []   # its host or port is rendered per event: checked before every request
    try:
        endpoints.check(literal_head(url).strip())
    except RenderError as exc:
        return [(at, str(exc).replace("rendered url", "url", 1))]
    return []


class TemplateRenderer:
    def __init__(self, dest: Destination, delivery: DeliveryConfig) -> None:
        self.destination = dest
        self.endpoints = Endpoints.of(dest, delivery)
        template = dest.template
        problems: list[tuple[str, str]] = []
        if dest.allowed_hosts == () and host_is_rendered(dest.url):
            problems.append(("allowed_hosts", "is empty while the url's host is a template: no "
                                              "rendered url could be sent; list the hosts it "
                                              "may reach (\"host\" or \"host:port\")"))
        method = template.method if template else "POST"
        body = template.body if template else None
        self._static_urls: dict[str, str | RenderError] = {}  # the default's and variants'
        self._default = self._compile(dest.url, method, dest.headers, body, "", problems)
        self._variants: dict[str, _Compiled] = {}
        for lang, variant in (template.variants if template else {}).items():
            # What a variant does not override is the default's, compiled once.
            own = self._compile(variant.url or "", variant.method or method, variant.headers or {},
                                variant.body, f"template.variants.{lang}.", problems)
            base = self._default
            self._variants[lang.lower()] = _Compiled(
                own.url if variant.url is not None else base.url,
                own.path_prefix if variant.url is not None else base.path_prefix,
                own.method,
                own.headers if variant.headers is not None else base.headers,
                own.body if variant.body is not None else base.body,
                own.content_type if variant.body is not None else base.content_type)
        for lang, variant in (template.variants if template else {}).items():
            if variant.url is not None:
                problems += _static_endpoint(self.endpoints, variant.url,
                                             f"template.variants.{lang}.url")
        if problems:
            raise ConfigError(problems)

    def _compile(self, url: str, method: str, headers: dict[str, str], body: Body | None,
                 at: str, problems: list[tuple[str, str]]) -> _Compiled:
        # Over the limits every rendered value is held to, a value without Liquid fails
        # every render: say so now (check-config said OK).
        if not has_markup(url) and len(url.encode()) > MAX_URL:
            problems.append((at + "url", f"is longer than {MAX_URL} bytes"))
        problems += [(f"{at}headers.{name}", f"is longer than {MAX_HEADER_VALUE} bytes")
                     for name, value in headers.items()
                     if not has_markup(value) and len(value.encode()) > MAX_HEADER_VALUE]
        url_t = compile_template(url, at + "url", problems)
        header_ts = tuple((name, compile_template(value, f"{at}headers.{name}", problems))
                          for name, value in headers.items())
        where = at or "template."
        compiled_body: tuple[str, Any] | None = None
        content_type: str | None = None
        if isinstance(body, JsonBody):
            compiled_body = ("json", tuple(
                (key, compile_template(value, f"{where}body.fields.{key}", problems))
                for key, value in body.fields.items()))
            content_type = "application/json"
        elif isinstance(body, RawBody):
            compiled_body = ("raw", compile_template(body.template, f"{where}body.template",
                                                     problems))
            content_type = body.content_type
        return _Compiled(url_t, static_path_prefix(url), method, header_ts, compiled_body,
                         content_type)

    def variant(self, language: str | None) -> _Compiled:
        """The exact language, else its primary subtag (fr-CA -> fr), else the default."""
        if language:
            lang = language.lower()
            found = self._variants.get(lang) or self._variants.get(lang.split("-", 1)[0])
            if found is not None:
                return found
        return self._default

    def _url(self, compiled: _Compiled, context: dict[str, Any]) -> str:
        """The URL to send, checked; a URL without markup is checked once (its verdict cannot
        change), and a refused one is refused again for every delivery."""
        if not isinstance(compiled.url, Text):
            return self.endpoints.check(_render(compiled.url, context, "url").strip(),
                                        compiled.path_prefix)
        verdict = self._static_urls.get(compiled.url.text)
        if verdict is None:
            try:
                verdict = self.endpoints.check(compiled.url.text.strip(), compiled.path_prefix)
            except RenderError as exc:
                verdict = exc
            self._static_urls[compiled.url.text] = verdict
        if isinstance(verdict, RenderError):
            raise RenderError(str(verdict))
        return verdict

    def render(self, event: Event, delivery_id: str) -> Request:
        compiled = self.variant(event.language)
        context = {"event": event.model_dump(mode="json"), "delivery_id": delivery_id,
                   "destination": self.destination.name}
        url = self._url(compiled, context)
        headers: dict[str, str] = {}
        if compiled.content_type is not None:
            headers["Content-Type"] = compiled.content_type
        rendered_headers = {}
        for name, template in compiled.headers:
            value = _render(template, context, f"headers.{name}")
            if _CONTROL.search(value):
                raise RenderError(f"header {name} rendered with a control character "
                                  "(line breaks included)")
            if len(value.encode()) > MAX_HEADER_VALUE:
                raise RenderError(f"header {name} rendered longer than {MAX_HEADER_VALUE} bytes")
            rendered_headers[name] = value
        headers = merge_headers(headers, rendered_headers)
        body = b""
        if compiled.body is not None:
            kind, spec = compiled.body
            if kind == "json":
                body = dumps({key: _render(t, context, f"body.fields.{key}") for key, t in spec})
            else:
                body = _render(spec, context, "body.template").encode()
        return Request(compiled.method, url, headers, body)


def _render(template: Template, context: dict[str, Any], what: str) -> str:
    try:
        return template.render(**context)
    except LiquidError as exc:
        raise RenderError(f"template {what} failed to render: {_first_line(exc)}") from exc
    except (TypeError, ValueError, ArithmeticError) as exc:  # filters on unexpected types
        raise RenderError(f"template {what} failed to render: {exc}") from exc


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
