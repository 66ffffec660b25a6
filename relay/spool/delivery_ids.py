"""Delivery ids that name their row in the SQLite spool, so it keeps no index on them.

An id is ``dlv_``, the creation time in milliseconds (11 hex digits) and the delivery's seq
enciphered with a key drawn per spool file (20 hex digits): 35 characters, as before schema 3.
The cipher is a four-round Feistel network over 80 bits whose round function is keyed
BLAKE2b: a keyed permutation, so ids are unique within a file by construction, and without the
key (kept in the file, table ``meta``) an id says nothing about its seq, so receivers cannot
count a relay's deliveries or relate two ids from their Webhook-Ids. Across relays the 80 bits
are as good as random.

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
from collections.abc import Iterable

_HALF = 40                     # bits in each half of the 80-bit block
_LOW = (1 << _HALF) - 1
_ROUNDS = 4
_MAX_SEQ = 2**63 - 1           # SQLite's INTEGER
_ID = re.compile(r"dlv_[0-9a-f]{11}([0-9a-f]{20})")

# The condition that finds a delivery ``d`` by id, with ``args``' three values: the seq the id
# names, or (an id from before schema 3) the one legacy_delivery_ids gives; the whole id checked.
BY_ID = ("d.seq IN (?, (SELECT seq FROM legacy_delivery_ids WHERE delivery_id = ?)) "
         "AND d.delivery_id = ?")


class DeliveryIds:
    """Makes delivery ids for seqs and reads the seq back, with the spool file's key."""

    def __init__(self, key: bytes) -> None:
        self._rounds = [hashlib.blake2b(key=key, digest_size=_HALF // 8,
                                        person=b"relay-dlv-round%d" % r) for r in range(_ROUNDS)]

    @classmethod
    def of(cls, conn: sqlite3.Connection) -> DeliveryIds:
        """With the key of the spool file ``conn`` is open on (schema 3 or later)."""
        row = conn.execute("SELECT value FROM meta WHERE name = 'delivery_id_key'").fetchone()
        if row is None:
            raise sqlite3.DatabaseError("the spool has no delivery_id_key in its meta table")
        return cls(bytes(row[0]))

    def make(self, prefix: str, seqs: Iterable[int]) -> list[str]:
        """The ids of these deliveries; ``prefix`` is relay.ids.delivery_id_prefix(now)."""
        return [f"{prefix}{self._encipher(seq):020x}" for seq in seqs]

    def seq_of(self, delivery_id: str) -> int:
        """The seq an id names if it is one of this spool's (0 if it cannot be one)."""
        found = _ID.fullmatch(delivery_id)
        if found is None:
            return 0
        seq = self._decipher(int(found[1], 16))
        return seq if seq <= _MAX_SEQ else 0

    def args(self, delivery_id: str) -> tuple[int, str, str]:
        """The values for ``BY_ID``."""
        return self.seq_of(delivery_id), delivery_id, delivery_id

    def _f(self, r: int, half: int) -> int:
        keyed = self._rounds[r].copy()
        keyed.update(half.to_bytes(_HALF // 8, "big"))
        return int.from_bytes(keyed.digest(), "big")

    def _encipher(self, seq: int) -> int:
        left, right = seq >> _HALF, seq & _LOW
        for r in range(_ROUNDS):
            left, right = right, left ^ self._f(r, right)
        return left << _HALF | right

    def _decipher(self, value: int) -> int:
        left, right = value >> _HALF, value & _LOW
        for r in reversed(range(_ROUNDS)):
            left, right = right ^ self._f(r, left), left
        return left << _HALF | right
