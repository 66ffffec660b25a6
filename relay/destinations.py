"""Each destination compiled once: renderer, signer, retry rules, timeout, host key and the
secrets to hide in what its receiver answers.

The one place where templates are parsed and signing keys loaded. ``load()`` is what every
command that runs or checks a config calls (serve, check-config, reload, render, test): the
config's structure from ``relay.config``, then each destination compiled here, every mistake a
``ConfigError`` naming its path (``destinations[2].auth.key``). The dispatcher uses the compiled
destinations it is handed, so nothing is compiled twice.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from relay import tracing
from relay.auth import Signing, header_problems
from relay.config import Config, Destination, OAuth2Auth
from relay.config.checks import holds
from relay.config.load import check_file
from relay.connection import Via, build_via
from relay.errors import ConfigError
from relay.events import Event
from relay.oauth2 import TokenProvider
from relay.payloads import Renderer, build_renderer
from relay.policy import RetryPolicy
from relay.redact import Echoes
from relay.request import Request, endpoint

MintCounter = Callable[[str], Callable[[], None]]  # destination name -> "a JWT was minted"


@dataclass(frozen=True, slots=True)
class CompiledDestination:
    """Everything needed to deliver to one destination, built once per config."""

    destination: Destination
    renderer: Renderer
    signing: Signing
    policy: RetryPolicy
    timeout: float        # seconds per attempt
    host: str | None      # scheme://host:port; None when event data chooses it (a template)
    via: Via | None = None              # TLS client certificate, CA bundle, proxy
    oauth2: TokenProvider | None = None  # auth.type oauth2: tokens fetched when sending
    echoes: Echoes = dataclasses.field(default_factory=Echoes)  # its secrets, echoed back

    @property
    def name(self) -> str:
        return self.destination.name

    def request(self, event: Event, delivery_id: str) -> Request:
        """The delivery's request: rendered, signed, with its connection options and the
        event's trace context (when tracing is on)."""
        request = self.signing.sign(self.renderer.render(event, delivery_id), delivery_id)
        if event.traceparent is not None and tracing.enabled():
            request = request.with_headers(traceparent=event.traceparent)
        return request.routed(self.via)


class Loaded(NamedTuple):
    """A config file, validated, with its destinations compiled."""

    config: Config
    destinations: dict[str, CompiledDestination]


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *,
         clock: Callable[[], float] = time.time, on_mint: MintCounter | None = None) -> Loaded:
    """Read and validate a config file and compile its destinations; ConfigError otherwise.

    One round: the destinations that pass validation are compiled even when other parts of the
    file are wrong, and the one ConfigError lists the problems of both passes.
    """
    checked = check_file(path, env)
    problems = list(checked.problems)
    compiled: dict[str, CompiledDestination] = {}
    config = checked.config
    if not holds(checked.broken, "delivery.allowed_ports"):
        # It failed validation: no port is refused for it here either (its default, 80 and
        # 443, would refuse a variant's port the file allows). The config is never served.
        config = config.model_copy(update={"delivery": config.delivery.model_copy(
            update={"allowed_ports": tuple(range(1, 65536))})})
    try:
        compiled = compile_destinations(config, clock=clock, on_mint=on_mint,
                                        positions=checked.positions)
    except ConfigError as exc:
        # one message per path: validation's, when both passes object to the same value
        named = {path for path, _ in problems}
        problems += [problem for problem in exc.problems if problem[0] not in named]
    if problems:
        raise ConfigError(dict.fromkeys(problems), str(path))  # each once, in file order
    return Loaded(checked.config, compiled)


def compile_destinations(config: Config, *, clock: Callable[[], float] = time.time,
                         on_mint: MintCounter | None = None,
                         positions: tuple[int, ...] | None = None) -> dict[str, CompiledDestination]:
    """Every destination of ``config`` compiled; one ConfigError lists every problem.
    ``positions`` is each destination's index in the file when some were left out."""
    compiled: dict[str, CompiledDestination] = {}
    problems: list[tuple[str, str]] = []
    for n, dest in enumerate(config.destinations):
        i = positions[n] if positions is not None else n
        try:
            compiled[dest.name] = compile_destination(
                dest, config, clock=clock, on_mint=on_mint(dest.name) if on_mint else None)
        except ConfigError as exc:
            problems += [(f"destinations[{i}].{path}", message) for path, message in exc.problems]
    if problems:
        raise ConfigError(problems, config.source)
    return compiled


def compile_destination(dest: Destination, config: Config, *,
                        clock: Callable[[], float] = time.time,
                        on_mint: Callable[[], None] | None = None) -> CompiledDestination:
    """One destination; ConfigError paths are relative to it (``auth.key``, ``url``)."""
    problems: list[tuple[str, str]] = []
    renderer = signing = via = None
    try:
        renderer = build_renderer(dest, config)
    except ConfigError as exc:
        problems += exc.problems
    try:
        via = build_via(dest, config)
    except ConfigError as exc:
        problems += exc.problems
    try:
        signing = Signing(dest, clock, on_mint)
    except ConfigError as exc:
        problems += exc.problems
    problems += header_problems(dest)
    if problems or renderer is None or signing is None:
        raise ConfigError(problems)
    policy = RetryPolicy.for_destination(config.delivery, dest)
    host = host_key(dest)
    if host is None and dest.unreachable_window is None:
        # An endpoint chosen by event data may never have existed: give up on one that cannot
        # be reached after retry_window, not after a day of retries.
        policy = dataclasses.replace(
            policy, unreachable_window=min(policy.unreachable_window, policy.retry_window))
    return CompiledDestination(
        destination=dest, renderer=renderer, signing=signing, policy=policy,
        timeout=dest.timeout or config.delivery.timeout, host=host, via=via,
        oauth2=TokenProvider(dest.auth, clock) if isinstance(dest.auth, OAuth2Auth) else None,
        echoes=Echoes.of(dest))


def host_key(dest: Destination) -> str | None:
    """The health key of a destination's host, ``scheme://host:port``; None when the host or
    port is a template (each rendered endpoint is then its own key: ``endpoint(url)``)."""
    head, *templated = re.split(r"\{\{|\{%", dest.url, maxsplit=1)
    if templated and "/" not in head.partition("://")[2]:
        return None  # a template starts before the path: the host or port is the event's
    try:
        return endpoint(head)
    except ValueError:   # not a URL urllib can split: the config check names it
        return None
