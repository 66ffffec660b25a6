"""The relay's exceptions, all in one place.

    RelayError
    ├── ConfigError               the YAML config is wrong; carries (path, message) pairs
    ├── InvalidEvent              a sender's event is wrong; carries (json path, message) pairs
    ├── SpoolError                the durable store cannot take or give data
    │   └── SpoolFull             spool.max_events reached, or the disk is full: answer 503
    └── RenderError               a delivery's request cannot be built (template failure, URL
                                  outside allowed_hosts/ports): it fails, nothing is sent

What a receiver answers (or a timeout, a refused connection) is not an exception: relay.policy
classifies it into an Outcome value (delivered / retry / failed). A suspended host is not an
error at all: its deliveries wait in the spool.
Library exceptions (yaml, pydantic, sqlite3, aiohttp, pyjwt) are mapped to these at the module
that calls the library, with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Iterable


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class _PathErrors(RelayError):
    """An error made of one or more (path, message) pairs."""

    def __init__(self, problems: Iterable[tuple[str, str]], summary: str) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        self.summary = summary
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.summary]
        lines += [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in self.problems]
        return "\n".join(lines)


class ConfigError(_PathErrors):
    """The configuration is invalid; ``problems`` name the config path of each mistake."""

    def __init__(self, problems: Iterable[tuple[str, str]], source: str = "config") -> None:
        problems = list(problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(problems, f"{source}: {len(problems)} {noun}")


class InvalidEvent(_PathErrors):
    """A posted event (or batch) is invalid; ``problems`` name the JSON path of each field."""

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        super().__init__(problems, "invalid event")

    def details(self) -> list[dict[str, str]]:
        return [{"path": path, "message": msg} for path, msg in self.problems]


class SpoolError(RelayError):
    """The spool could not complete an operation (I/O error, corrupt file, closed)."""


class SpoolFull(SpoolError):
    """The spool refuses new events until deliveries drain or disk space returns."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RenderError(RelayError):
    """The request for this delivery cannot be built; no request is sent."""
