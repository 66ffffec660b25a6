"""Delivery ids that name their row in the SQLite spool, so it keeps no index on them.

An id is ``dlv_``, the creation time in milliseconds (11 hex digits), the seq of its event's
first delivery enciphered with a key drawn per spool file (16 hex digits) and the delivery's
place among its event's deliveries (4 hex digits): 35 characters, as before schema 3. The
cipher is a four-round Feistel network over 64 bits whose round function is keyed BLAKE2b: a
keyed permutation, so ids are unique within a file by construction, and without the key (kept
in the file, table ``meta``) an id says nothing about its seq: receivers cannot count a relay's
events or deliveries or relate the ids of two events from their Webhook-Ids. (The ids of one
event share their first part, as its payloads say they are one event, and the last four digits
give a delivery's place among that event's deliveries.) Across relays the 64 bits are
as good as random. One cipher per event: the ids of its deliveries cost one Feistel network.

The activity log and replays find a delivery by deciphering the seq from its id, a rowid
lookup, and return the row only if its stored id is the whole id asked for; a made-up id finds
nothing. Before schema 3 the deliveries table kept a unique index on the id: one more B-tree
page dirtied by every commit (bench/writer.py; docs/performance.md). Ids made before schema 3
(random, same shape) name no row; they are found through the table ``legacy_delivery_ids`` that
the migration filled.

Stdlib only: the writer process imports this.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3

_HALF = 32                     # bits in each half of the 64-bit block
_LOW = (1 << _HALF) - 1
_ROUNDS = 4
_MAX_PLACE = 0xFFFF            # deliveries per event an id can tell apart
_MAX_SEQ = 2**63 - 1           # SQLite's INTEGER
_PLACES = tuple(f"{place:04x}" for place in range(64))  # the usual fan-outs, written once
_ID = re.compile(r"dlv_[0-9a-f]{11}([0-9a-f]{16})([0-9a-f]{4})")

# The condition that finds a delivery ``d`` by id, with ``args``' three values: the seq the id
# names, or (an id from before schema 3) the one legacy_delivery_ids gives; the whole id checked.
BY_ID = ("d.seq IN (?, (SELECT seq FROM legacy_delivery_ids WHERE delivery_id = ?)) "
         "AND d.delivery_id = ?")


class DeliveryIds:
    """Makes delivery ids for seqs and reads the seq back, with the spool file's key."""

    def __init__(self, key: bytes) -> None:
        self._rounds = [hashlib.blake2b(key=key, digest_size=_HALF // 8,
                                        person=b"relay-dlv-round%d" % r) for r in range(_ROUNDS)]
        self._copies = [keyed.copy for keyed in self._rounds]

    @classmethod
    def of(cls, conn: sqlite3.Connection) -> DeliveryIds:
        """With the key of the spool file ``conn`` is open on (schema 3 or later)."""
        row = conn.execute("SELECT value FROM meta WHERE name = 'delivery_id_key'").fetchone()
        if row is None:
            raise sqlite3.DatabaseError("the spool has no delivery_id_key in its meta table")
        return cls(bytes(row[0]))

    def make(self, prefix: str, seqs: range) -> list[str]:
        """The ids of one event's deliveries, whose seqs are ``seqs`` (consecutive, as the
        writer numbers them); ``prefix`` is relay.ids.delivery_id_prefix(now)."""
        if len(seqs) > _MAX_PLACE + 1 or seqs.step != 1:
            raise ValueError(f"an event's delivery ids take at most {_MAX_PLACE + 1} "
                             f"consecutive seqs, not {seqs}")
        if not seqs:
            return []
        # (the same text as f"{head}{place:04x}" and f"{block:016x}", without a format spec
        # parsed per id: 1.5 of the 4 us an event's ids cost)
        head = prefix + self._encipher(seqs.start).to_bytes(8, "big").hex()
        if len(seqs) <= len(_PLACES):
            return [head + place for place in _PLACES[:len(seqs)]]
        return [f"{head}{place:04x}" for place in range(len(seqs))]

    def seq_of(self, delivery_id: str) -> int:
        """The seq an id names if it is one of this spool's (0 if it cannot be one)."""
        found = _ID.fullmatch(delivery_id)
        if found is None:
            return 0
        seq = self._decipher(int(found[1], 16)) + int(found[2], 16)
        return seq if seq <= _MAX_SEQ else 0

    def args(self, delivery_id: str) -> tuple[int, str, str]:
        """The values for ``BY_ID``."""
        return self.seq_of(delivery_id), delivery_id, delivery_id

    def _encipher(self, block: int) -> int:
        left, right = block >> _HALF, block & _LOW
        for copy in self._copies:  # (bound once: one per ingested event, in the writer)
            round_ = copy()
            round_.update(right.to_bytes(_HALF // 8, "big"))
            left, right = right, left ^ int.from_bytes(round_.digest(), "big")
        return left << _HALF | right

    def _decipher(self, block: int) -> int:
        left, right = block >> _HALF, block & _LOW
        for keyed in reversed(self._rounds):
            round_ = keyed.copy()
            round_.update(left.to_bytes(_HALF // 8, "big"))
            left, right = right ^ int.from_bytes(round_.digest(), "big"), left
        return left << _HALF | right
