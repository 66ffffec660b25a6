"""Logging: one JSON object per line (or text on a terminal), with secrets masked.

Fields given as ``extra={...}`` (delivery_id, destination, host, outcome, ...) become JSON keys.
Every configured secret value is replaced by ``****`` in every message, whatever logged it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable

from relay.config import BasicAuth, BearerAuth, Config, HmacAuth, JwtAuth

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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class MaskSecrets(logging.Filter):
    """Replaces known secret values in log messages (and their arguments) with ****."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret containing another is masked whole; tiny values would
        # mask ordinary words, so they are left alone.
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = message
        for secret in self.secrets:
            if secret in masked:
                masked = masked.replace(secret, "****")
        if masked != message:
            record.msg, record.args = masked, None
        return True


def config_secrets(config: Config) -> list[str]:
    """Every secret value in a config, for masking."""
    found: list[str] = []
    if config.server.token:
        found.append(config.server.token.get_secret_value())
    if config.spool.postgres.dsn:
        found.append(config.spool.postgres.dsn.get_secret_value())
    for dest in config.destinations:
        auth = dest.auth
        if isinstance(auth, BearerAuth):
            found.append(auth.token.get_secret_value())
        elif isinstance(auth, BasicAuth):
            found.append(auth.password.get_secret_value())
        elif isinstance(auth, JwtAuth):
            found.append(auth.key.get_secret_value())
        elif isinstance(auth, HmacAuth):
            found += [s.get_secret_value() for s in ([auth.secret] if auth.secret else [])]
            found += [s.get_secret_value() for s in auth.secrets]
        for name, value in dest.headers.items():
            if name.lower() in ("authorization", "x-api-key", "api-key", "cookie"):
                found.append(value.split(" ", 1)[-1])
    return found


MASK = MaskSecrets()


def setup_logging(config: Config) -> None:
    """Configure the root logger from server.log_level / RELAY_LOG_LEVEL and log_format."""
    level = os.environ.get("RELAY_LOG_LEVEL", config.server.log_level).upper()
    fmt = os.environ.get("RELAY_LOG_FORMAT", config.server.log_format)
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    MASK.update(config_secrets(config))
    handler.addFilter(MASK)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
