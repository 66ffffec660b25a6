"""Warnings about a valid config: things that work but are likely wrong.

``check-config`` prints them and still succeeds; nothing here refuses a config. Two rules:
more ``server.workers`` than this machine has cores for the relay (they would only share
them), and a ``raw`` template body sent as JSON (``application/json`` or ``+json``) that prints a value
without the ``json`` filter, so event data such as ``", "admin": true, "x": "`` could add keys
(issue 15). Outputs whose last filter is ``json`` (a JSON literal) or ``json_escape`` (escaped
for use inside a quoted JSON string, Braze's documented way) are safe; literals are too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from liquid import RenderContext
from liquid.ast import Node
from liquid.builtin.expressions import FilteredExpression, Literal
from liquid.builtin.output import OutputNode
from liquid.builtin.tags.echo_tag import EchoNode
from liquid.exceptions import LiquidError

from relay.config.schema import Config, Destination, JsonBody, RawBody
from relay.liquid import parse

SAFE_LAST_FILTERS = frozenset({"json", "json_escape"})


def config_warnings(config: Config) -> list[tuple[str, str]]:
    """``(path, message)`` for each warning, in config order."""
    warnings: list[tuple[str, str]] = []
    cores = usable_cores()
    if config.server.workers > cores:
        warnings.append(("server.workers", f"{config.server.workers} workers, but this "
                         f"machine gives the relay {cores} cores: workers beyond the cores only "
                         "share them (and each costs ~70 MB); see docs/operations.md"))
    for _, path, _, body in json_raw_bodies(config):
        warnings += [(path, message) for message in unescaped_outputs(body.template)]
    return warnings


def json_raw_bodies(config: Config) -> Iterator[tuple[Destination, str, str | None, RawBody]]:
    """Each raw template body sent as JSON (``application/json`` or ``+json``): its
    destination, its template's path (``destinations[0].template.body.template``), the
    language of the variant it is (None: the default) and the body."""
    for i, dest in enumerate(config.destinations):
        template = dest.template
        if dest.format != "template" or template is None:
            continue
        at = f"destinations[{i}].template"
        bodies: list[tuple[str, str | None, JsonBody | RawBody | None, dict[str, str]]] = [
            (f"{at}.body.template", None, template.body, dest.headers)]
        bodies += [(f"{at}.variants.{lang}.body.template", lang, v.body,
                    v.headers if v.headers is not None else dest.headers)
                   for lang, v in template.variants.items() if v.body is not None]
        for path, language, body, headers in bodies:
            if isinstance(body, RawBody) and is_json_type(sent_content_type(body, headers)):
                yield dest, path, language, body


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity; a container's CPU quota is not seen)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def unescaped_outputs(source: str) -> list[str]:
    """A message for each output in ``source`` that prints a value without ``json``.

    A template that does not parse gives none here: loading reports it as an error.
    """
    try:
        template = parse(source)
    except LiquidError:
        return []
    context = RenderContext(template)
    found = []
    for node in _outputs(template.nodes, context):
        expression = node.expression
        if not isinstance(expression, FilteredExpression):
            continue
        filters = expression.filters or []
        if not filters and isinstance(expression.left, Literal):
            continue
        if filters and filters[-1].name in SAFE_LAST_FILTERS:
            continue
        line, column = _position(source, node.token.start_index)
        found.append(f"{str(node)!r} (line {line}, column {column}) prints a value into a JSON "
                     f"body without the json filter: event data could break out of its string; "
                     f"write {{{{ ... | json }}}} (a JSON literal)")
    return found


def _outputs(nodes: list[Node], context: RenderContext) -> Iterator[OutputNode | EchoNode]:
    for node in nodes:
        if isinstance(node, OutputNode | EchoNode):
            yield node
        yield from _outputs(list(node.children(context, include_partials=False)), context)


def sent_content_type(body: RawBody, headers: dict[str, str]) -> str:
    """The Content-Type sent: a configured header overrides the body's ``content_type``."""
    given = [v for k, v in headers.items() if k.lower() == "content-type"]
    return given[-1] if given else body.content_type


def _position(source: str, index: int) -> tuple[int, int]:
    before = source[:max(index, 0)]
    return before.count("\n") + 1, index - (before.rfind("\n") + 1) + 1
