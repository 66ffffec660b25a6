"""JSON encoding and timestamps shared by the fixed payload shapes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, keys in insertion order (the documented order)."""
    return _encode(obj).encode()


def braze_time(moment: datetime) -> str:
    """``2020-08-31T18:58:42.000+00:00``: UTC, milliseconds, ``+00:00``, whatever the input."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")
