"""Braze-style webhook campaigns: Liquid-templated URL, method, headers and body.

Templates are parsed once, when the renderer is built; syntax errors are config errors naming
the destination and key. At render time the context is ``event`` (the stored event, so
``event.attributes.order_id`` works), ``delivery_id`` and ``destination``. Missing values render
empty, as in Braze, and the ``default`` filter supplies a fallback. A render error, a header
value with a line break, or a rendered URL outside ``allowed_hosts`` / ``delivery.allowed_ports``
raises RenderError: the delivery fails with that reason and no request is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from liquid import BoundTemplate, Environment
from liquid.exceptions import LiquidError

from relay.config import Destination, JsonBody, RawBody, allowed_hosts
from relay.config.schema import Body
from relay.errors import ConfigError, RenderError
from relay.events import Event
from relay.payloads._json import dumps
from relay.request import Request, merge_headers

ENV = Environment()


def parse(source: str, path: str) -> BoundTemplate:
    """Parse one template; a syntax error becomes a ConfigError at ``path``."""
    try:
        return ENV.from_string(source)
    except LiquidError as exc:
        raise ConfigError([(path, f"Liquid syntax error: {_first_line(exc)}")]) from exc


@dataclass(frozen=True, slots=True)
class _Compiled:
    url: BoundTemplate
    method: str
    headers: tuple[tuple[str, BoundTemplate], ...]
    body: tuple[str, Any] | None          # ("json", ((key, template), ...)) | ("raw", template)
    content_type: str | None


class TemplateRenderer:
    def __init__(self, dest: Destination, allowed_ports: tuple[int, ...]) -> None:
        assert dest.template is not None or not allowed_ports, "config guarantees a template"
        self.destination = dest
        self._ports = frozenset(allowed_ports)
        self._hosts = allowed_hosts(dest)
        template = dest.template
        problems: list[tuple[str, str]] = []
        method = template.method if template else "POST"
        body = template.body if template else None
        self._default = self._compile(dest.url, method, dest.headers, body, "", problems)
        self._variants: dict[str, _Compiled] = {}
        for lang, variant in (template.variants if template else {}).items():
            # What a variant does not override is the default's, compiled once.
            own = self._compile(variant.url or "", variant.method or method, variant.headers or {},
                                variant.body, f"template.variants.{lang}.", problems)
            base = self._default
            self._variants[lang.lower()] = _Compiled(
                own.url if variant.url is not None else base.url,
                own.method,
                own.headers if variant.headers is not None else base.headers,
                own.body if variant.body is not None else base.body,
                own.content_type if variant.body is not None else base.content_type)
        if problems:
            raise ConfigError(problems)

    def _compile(self, url: str, method: str, headers: dict[str, str], body: Body | None,
                 at: str, problems: list[tuple[str, str]]) -> _Compiled:
        def compile_one(source: str, path: str) -> BoundTemplate:
            try:
                return parse(source, at + path)
            except ConfigError as exc:
                problems.extend(exc.problems)
                return ENV.from_string("")

        url_t = compile_one(url, "url")
        header_ts = tuple((name, compile_one(value, f"headers.{name}"))
                          for name, value in headers.items())
        where = at or "template."
        compiled_body: tuple[str, Any] | None = None
        content_type: str | None = None
        if isinstance(body, JsonBody):
            compiled_body = ("json", tuple(
                (key, compile_one(value, f"{where.removeprefix(at)}body.fields.{key}"))
                for key, value in body.fields.items()))
            content_type = "application/json"
        elif isinstance(body, RawBody):
            compiled_body = ("raw", compile_one(body.template,
                                                f"{where.removeprefix(at)}body.template"))
            content_type = body.content_type
        return _Compiled(url_t, method, header_ts, compiled_body, content_type)

    def variant(self, language: str | None) -> _Compiled:
        """The exact language, else its primary subtag (fr-CA -> fr), else the default."""
        if language:
            lang = language.lower()
            found = self._variants.get(lang) or self._variants.get(lang.split("-", 1)[0])
            if found is not None:
                return found
        return self._default

    def render(self, event: Event, delivery_id: str) -> Request:
        compiled = self.variant(event.language)
        context = {"event": event.model_dump(mode="json"), "delivery_id": delivery_id,
                   "destination": self.destination.name}
        url = _render(compiled.url, context, "url").strip()
        self._check_url(url)
        headers: dict[str, str] = {}
        if compiled.content_type is not None:
            headers["Content-Type"] = compiled.content_type
        rendered_headers = {}
        for name, template in compiled.headers:
            value = _render(template, context, f"headers.{name}")
            if "\r" in value or "\n" in value:
                raise RenderError(f"header {name} rendered with a line break")
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

    def _check_url(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise RenderError(f"rendered url is not valid ({exc}): {url!r}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RenderError(f"rendered url is not an http(s) URL with a host: {url!r}")
        host = parts.hostname.lower()
        if host not in self._hosts:
            raise RenderError(f"rendered url host {host!r} is not in allowed_hosts "
                              f"({', '.join(sorted(self._hosts))})")
        port = port or (443 if parts.scheme == "https" else 80)
        if port not in self._ports:
            raise RenderError(f"rendered url port {port} is not in delivery.allowed_ports")


def _render(template: BoundTemplate, context: dict[str, Any], what: str) -> str:
    try:
        return template.render(**context)
    except LiquidError as exc:
        raise RenderError(f"template {what} failed to render: {_first_line(exc)}") from exc
    except (TypeError, ValueError, ArithmeticError) as exc:  # filters on unexpected types
        raise RenderError(f"template {what} failed to render: {exc}") from exc


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
