"""Identifiers the relay generates: event ids, AJO request ids, delivery ids (Webhook-Id).

They must be unique (across relays too, since receivers de-duplicate on them), not secret, so a
PRNG seeded from the OS is enough; ``os.urandom`` per id measured as a top cost of ingest.
Delivery ids start with the time in milliseconds (``delivery_id_prefix``). The SQLite spool
follows it with the delivery's seq enciphered (relay/spool/delivery_ids.py), so it can find a
delivery by its id without an index; the PostgreSQL spool, previews and test sends follow it
with random bits (``random_part``).
"""

from __future__ import annotations

import os
import random

_rng = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _rng.seed(os.urandom(32)))


def event_id() -> str:
    return "evt_" + _rng.getrandbits(128).to_bytes(16, "big").hex()


def request_id() -> str:
    """32 characters, like AJO's ``requestId``. (The bytes' hex is the number's zero-padded
    hex, in 40 % of the time an f-string's format spec takes: one per ingested event.)"""
    return _rng.getrandbits(128).to_bytes(16, "big").hex()


def delivery_id(now: float) -> str:
    return f"{delivery_id_prefix(now)}{random_part():020x}"


def delivery_id_prefix(now: float) -> str:
    return f"dlv_{int(now * 1000):011x}"


def random_part() -> int:
    """76 random bits, shifted: the PostgreSQL spool gives an event's deliveries
    ``random_part() + 1``, ``+ 2``, ... (one PRNG call per event instead of one per delivery;
    ids stay as unique)."""
    return _rng.getrandbits(76) << 4
