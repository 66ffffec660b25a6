"""The ingest answer's text, written by the writer: delivery listings and receipt JSON.

An event row keeps the deliveries created for it as a compact listing (``pack``/``unpack``), so
a duplicate's answer needs no join; ``receipt_entry`` writes one event of the ingest answer as
JSON directly. Pure string functions: stdlib only, no SQL, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence


def pack(deliveries: Sequence[tuple[str, str, str]]) -> str:
    """``[(destination, delivery_id, state)]`` as ``dest id state|...`` (names have no spaces
    or bars: config restricts them), several times cheaper than JSON on the ingest path."""
    return "|".join(map(" ".join, deliveries))


_plain = re.compile(r"[A-Za-z0-9_.:@+/=-]*").fullmatch  # JSON strings needing no escapes


def receipt_entry(event_id: str, deliveries: Sequence[tuple[str, str, str]], duplicate: bool) -> str:
    """One event of the ingest answer (``{"id", "deliveries": [{"destination",
    "delivery_id", "skipped"?}], "duplicate"?}``), written directly: json.dumps of nested dicts
    cost as much as validating the events. Destination names (config-checked) and delivery ids
    (hex) need no escaping; a sender's id is written as it is when it holds only characters JSON
    never escapes, else through json.dumps."""
    refs = ",".join([f'{{"destination":"{dest}","delivery_id":"{did}"'   # (a list: join
                     + (',"skipped":true}' if state == "skipped" else "}")  # makes one of a
                     for dest, did, state in deliveries])                   # generator anyway)
    quoted = f'"{event_id}"' if _plain(event_id) else json.dumps(event_id, ensure_ascii=False)
    return f'{{"id":{quoted},"deliveries":[{refs}]' + (',"duplicate":true}' if duplicate else "}")


def unpack(listing: str) -> list[tuple[str, str, str]]:
    """``pack``'s listing back as ``[(destination, delivery_id, state)]``."""
    return [tuple(part.split(" ", 2)) for part in listing.split("|")] if listing else []  # type: ignore[misc]
