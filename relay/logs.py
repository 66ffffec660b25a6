"""Logging: one JSON object per line (or text on a terminal), with secrets masked.

Fields given as ``extra={...}`` (delivery_id, destination, host, outcome, ...) become JSON keys.
Every configured secret value (``config_secrets``) is replaced by ``****`` in every message,
``extra`` field and traceback, whatever logged it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus

from relay.auth import MASKED
from relay.config import Config
from relay.redact import credentials

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_text:  # set (and masked) by MaskSecrets
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


# A secret shorter than this is masked only where it stands as a whole token (not next to a
# letter or digit): a 3-character token is hidden in "token=abc" and "Bearer abc" but the
# "abc" inside "abcdef" is left alone, so a short secret does not shred every log line.
# Longer secrets are masked wherever they occur.
WHOLE_TOKEN_BELOW = 8


class _Worker(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


class MaskSecrets(logging.Filter):
    """Replaces known secret values with ``****`` in a record's message and arguments, its
    ``extra`` fields and its traceback, whatever logged it. Secrets of any length are masked
    (see ``WHOLE_TOKEN_BELOW`` for how short ones are matched)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.pattern: re.Pattern[str] | None = None
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        values: set[str] = set()
        for secret in secrets:
            secret = secret.strip()
            if secret:
                # As written, and as it appears percent-encoded in a logged URL.
                values |= {secret, quote(secret, safe=""), quote_plus(secret, safe="")}
        # Longest first, so a secret containing another is masked whole.
        parts = [re.escape(s) if len(s) >= WHOLE_TOKEN_BELOW
                 else rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])"
                 for s in sorted(values, key=len, reverse=True)]
        self.pattern = re.compile("|".join(parts)) if parts else None

    def mask(self, text: str) -> str:
        return self.pattern.sub(MASKED, text) if self.pattern is not None else text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pattern is None:
            return True
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and not key.startswith("_"):
                setattr(record, key, self._mask_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True

    def _mask_value(self, value: object) -> object:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {k: self._mask_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._mask_value(v) for v in value]
        if value is None or isinstance(value, bool):
            return value
        text = str(value)  # a number, or an object JSON output would show by str()
        masked = self.mask(text)
        return value if masked == text else masked


_PLAIN = logging.Formatter()


class Throttle:
    """At most one line per ``every`` seconds for a kind of noise (junk requests): ``allow()``
    says whether to log this one, and how many were held back since the last."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.clock = every, clock
        self._last: float | None = None
        self._held = 0

    def allow(self) -> int | None:
        """None: do not log this one (it is counted); else the count held back before it."""
        now = self.clock()
        if self._last is not None and now - self._last < self.every:
            self._held += 1
            return None
        self._last, held, self._held = now, self._held, 0
        return held

    def say(self, emit: Callable[..., None], message: str, *args: Any) -> None:
        """``emit(message, *args)`` (a logger's ``error``, ``warning``...) if ``allow()`` lets
        it through, with the count held back since the last one added."""
        held = self.allow()
        if held is not None:
            emit(message + "%s", *args, f" ({held} more since the last such line)" if held else "")


def config_secrets(config: Config) -> list[str]:
    """Every secret value in a config, for masking: ``server.token``, the DSN and each
    destination's ``relay.redact.credentials`` (its auth secrets, and the header and query
    values whose name says they are credentials, as an echo of them is looked for; here of
    any length: a short one is masked as a whole token). Not every header value: ``X-Env:
    example`` made every "example" in the log ``****``, the destination name ``ajo-example``
    too."""
    found: list[str] = []
    if config.server.token:
        found.append(config.server.token.get_secret_value())
    if config.spool.postgres.dsn:
        found.append(config.spool.postgres.dsn.get_secret_value())
    for dest in config.destinations:
        found += credentials(dest)[0]
    return found


MASK = MaskSecrets()


def setup_logging(config: Config, worker: int | None = None) -> None:
    """Configure the root logger from server.log_level / RELAY_LOG_LEVEL and log_format;
    a worker of server.workers > 1 says which one it is on every line (``worker`` field)."""
    level = os.environ.get("RELAY_LOG_LEVEL", config.server.log_level).upper()
    fmt = os.environ.get("RELAY_LOG_FORMAT", config.server.log_format)
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    who = "" if worker is None else f" [worker {worker}]"
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        f"%(asctime)s %(levelname)s %(name)s{who}: %(message)s"))
    MASK.update(config_secrets(config))
    handler.addFilter(MASK)
    if worker is not None:
        handler.addFilter(_Worker(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
