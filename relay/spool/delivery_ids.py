"""Delivery ids that name their row in the SQLite spool, so it keeps no index on them.

An id is ``dlv_``, the creation time in milliseconds (11 hex digits), a 32-bit salt drawn per
event (8 hex digits) and the delivery's seq masked with a keyed hash of the salt (12 hex
digits): 35 characters, as before schema 3. The activity log and replays find a delivery by the
seq its id names, a rowid lookup, and return the row only if its stored id is the whole id asked
for; a made-up id finds nothing. Before schema 3 the deliveries table kept a unique index on the
id, one more B-tree insert per delivery (bench/writer.py; docs/performance.md).

Ids stay unique: within a spool the seq is (one salt and mask per event, one seq per delivery);
across relays their last 80 bits are as good as random, the key being drawn per spool file. The
key is kept in the file (table ``meta``), so a receiver cannot read from its Webhook-Ids how many
deliveries the relay made: two events' ids have unrelated masks. Ids made before schema 3 name
no row; they are found through the table ``legacy_delivery_ids`` that the migration filled.

Stdlib only: the writer process imports this.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3

SALT_BITS = 32
SEQ_BITS = 48   # 2.8e14 deliveries per spool file
_ID = re.compile(r"dlv_[0-9a-f]{11}([0-9a-f]{8})([0-9a-f]{12})")

# The condition that finds a delivery ``d`` by id, with ``args``' three values: the seq the id
# names, or (an id from before schema 3) the one legacy_delivery_ids gives; the whole id checked.
BY_ID = ("d.seq IN (?, (SELECT seq FROM legacy_delivery_ids WHERE delivery_id = ?)) "
         "AND d.delivery_id = ?")


class DeliveryIds:
    """Makes delivery ids for seqs and reads the seq back, with the spool file's key."""

    def __init__(self, key: bytes) -> None:
        self._keyed = hashlib.blake2b(key=key, digest_size=SEQ_BITS // 8)

    @classmethod
    def of(cls, conn: sqlite3.Connection) -> DeliveryIds:
        """With the key of the spool file ``conn`` is open on (schema 3 or later)."""
        row = conn.execute("SELECT value FROM meta WHERE name = 'delivery_id_key'").fetchone()
        if row is None:
            raise sqlite3.DatabaseError("the spool has no delivery_id_key in its meta table")
        return cls(bytes(row[0]))

    def make(self, prefix: str, salt: int, seqs: range) -> list[str]:
        """The ids of one event's deliveries: ``prefix`` is relay.ids.delivery_id_prefix(now),
        ``salt`` 32 random bits (relay.ids.salt()), ``seqs`` the deliveries' seqs."""
        if seqs and seqs[-1] >> SEQ_BITS:
            raise ValueError(f"delivery seq {seqs[-1]} has more than {SEQ_BITS} bits")
        mask = self._mask(salt)
        head = f"{prefix}{salt:08x}"
        return [f"{head}{seq ^ mask:012x}" for seq in seqs]

    def seq_of(self, delivery_id: str) -> int:
        """The seq an id names if it is one of this spool's (0 if it cannot be one)."""
        found = _ID.fullmatch(delivery_id)
        if found is None:
            return 0
        return int(found[2], 16) ^ self._mask(int(found[1], 16))

    def args(self, delivery_id: str) -> tuple[int, str, str]:
        """The values for ``BY_ID``."""
        return self.seq_of(delivery_id), delivery_id, delivery_id

    def _mask(self, salt: int) -> int:
        keyed = self._keyed.copy()
        keyed.update(salt.to_bytes(SALT_BITS // 8, "big"))
        return int.from_bytes(keyed.digest(), "big")
