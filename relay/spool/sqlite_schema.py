"""The spool file's schema and settings: creating, migrating and opening the SQLite file.

Both processes open the file through ``connect`` (the writer to write, the relay's reader thread
to read), so both use the same journal mode and busy timeout. ``migrate`` runs only in the
writer. Stdlib only: the writer imports this at start-up. It never decides what goes in the
tables; the writer's jobs (relay/spool/commit.py) do.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from relay.spool.wire import JobError

SCHEMA_VERSION = 4

# A table of deliveries (the migration to schema 3 builds a new one under another name)
DELIVERIES = """
CREATE TABLE {name}(
    seq         INTEGER PRIMARY KEY,
    delivery_id TEXT NOT NULL,              -- Webhook-Id: stable across retries; it names this
                                            -- row, so no index (relay/spool/delivery_ids.py)
    event_seq   INTEGER NOT NULL REFERENCES events(seq),
    destination TEXT NOT NULL,
    state       TEXT NOT NULL,              -- pending | delivered | failed | skipped
    attempts    INTEGER NOT NULL DEFAULT 0, -- requests tried (or render failures)
    failures    INTEGER NOT NULL DEFAULT 0, -- retryable responses (5xx, 408, 429): max_retries
    first_attempt_at REAL,                  -- start of the retry windows
    held        REAL NOT NULL DEFAULT 0,    -- seconds its host was suspended since then
    not_before  REAL NOT NULL,              -- not attempted before this unix time
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    reason      TEXT                        -- why skipped / failed, for the activity log
);
"""
# Pending deliveries by destination, then due time: reads walk it once per destination they
# ask for (relay/spool/queue.py), so one destination's backlog is never read for another's.
DELIVERIES_DUE = ("CREATE INDEX deliveries_due ON deliveries(destination, not_before, seq) "
                  "WHERE state = 'pending';")

# The spool's own settings: the key that enciphers seqs in delivery ids (SQLite's randomblob is
# seeded from the OS). And the delivery ids made before schema 3, which do not name their row.
META = """
CREATE TABLE meta(
    name        TEXT PRIMARY KEY,
    value       BLOB NOT NULL
) WITHOUT ROWID;
INSERT INTO meta(name, value) VALUES ('delivery_id_key', randomblob(16));
CREATE TABLE legacy_delivery_ids(
    seq         INTEGER PRIMARY KEY,        -- the delivery's
    delivery_id TEXT NOT NULL UNIQUE
);
"""

SCHEMA = """
CREATE TABLE events(
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL,              -- the sender's id, or one the relay generated
    sender_id   INTEGER NOT NULL,           -- 1: id is the sender's idempotency key
    received_at REAL NOT NULL,
    pending     INTEGER NOT NULL,           -- deliveries of this event not yet finished
    deliveries  TEXT NOT NULL,              -- 'destination delivery_id state|...' as created
    body        TEXT NOT NULL,              -- the normalised event JSON
    size        INTEGER NOT NULL DEFAULT 0  -- length of body: due batches are bounded by it
);
CREATE INDEX events_by_sender_id ON events(id) WHERE sender_id = 1;
""" + DELIVERIES.format(name="deliveries") + DELIVERIES_DUE + """

CREATE TABLE attempts(
    delivery_seq INTEGER NOT NULL,
    n            INTEGER NOT NULL,
    at           REAL NOT NULL,
    duration     REAL,
    status_code  INTEGER,
    error        TEXT,
    excerpt      TEXT,
    PRIMARY KEY (delivery_seq, n)
) WITHOUT ROWID;
""" + META


def connect(path: str) -> sqlite3.Connection:
    """A connection to the spool file with the relay's settings (used by both processes)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30,
                               cached_statements=256)  # room for every run_chunked size
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit is fsynced, so an acknowledged event survives power loss, not only
        # a process crash. Group commit pays for one fsync per group, not per request. The
        # writer drops to NORMAL for groups of attempt outcomes only (Writer._fsync_commit).
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA busy_timeout=30000")
        # after a large transaction (a migration) the WAL file is cut back to this at the next
        # checkpoint instead of keeping its largest size
        conn.execute("PRAGMA journal_size_limit=67108864")
        return conn
    except (sqlite3.Error, OSError) as exc:
        raise JobError("error", f"cannot open spool {path}: {exc}") from exc


def migrate(conn: sqlite3.Connection,
            starting: Callable[[int, int], None] = lambda old, new: None) -> None:
    """Create the tables in a new file, bring an older file up to date (forward only, in one
    transaction; ``starting(old, new)`` is called first); refuse a file written by a newer
    schema."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise JobError("error", f"the spool was written by a newer relay (schema {version}, this "
                                f"relay knows {SCHEMA_VERSION}); upgrade the relay or use another "
                                "spool.path")
    if version == 0:
        conn.executescript("BEGIN;" + SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        return
    _check_room(conn, version)
    starting(version, SCHEMA_VERSION)
    steps = "".join(MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
    conn.executescript("BEGIN;" + steps + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")


_COLUMNS = ("seq, delivery_id, event_seq, destination, state, attempts, failures, "
            "first_attempt_at, held, not_before, created_at, updated_at, reason")


def _check_room(conn: sqlite3.Connection, version: int) -> None:
    """Refuse to start a migration the disk cannot hold: from schema 1 or 2 the deliveries
    table is copied (the old copy's pages stay in the file, free, for new rows) and the copy
    passes through the WAL, so the disk needs up to twice the file's size free. (A size limit
    the filesystem does not report, as an emptyDir's sizeLimit, is not seen here.)"""
    if version >= 3:
        return
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if not path:
        return
    pages, page_size = (conn.execute(f"PRAGMA {name}").fetchone()[0]
                        for name in ("page_count", "page_size"))
    # measured: the copy took 1.1x (large bodies) to 2.1x (small ones) the file's size
    need, free = 2 * pages * page_size + 64 * 2**20, shutil.disk_usage(Path(path).parent).free
    if free < need:
        raise JobError("error", f"migrating the spool {path} to schema {SCHEMA_VERSION} needs "
                                f"about {need // 2**20 + 1} MiB free on its disk, and "
                                f"{free // 2**20} MiB are: free some space (or give the volume "
                                "more) and start the relay again")


# version -> the statements that bring a file of that version to the next one
MIGRATIONS = {
    1: "ALTER TABLE events ADD COLUMN size INTEGER NOT NULL DEFAULT 0;"
       "UPDATE events SET size = length(body) WHERE pending > 0;",
    # Delivery ids name their row from now on: the deliveries table is rebuilt without the
    # unique index on delivery_id (SQLite cannot drop a UNIQUE constraint's index), and the
    # ids made so far go to legacy_delivery_ids, which finds them. Prune finds old events by
    # seq (seqs grow with time), so the index of events by time goes too.
    2: "DROP INDEX events_by_time;"
       + META
       + "INSERT INTO legacy_delivery_ids(seq, delivery_id) SELECT seq, delivery_id "
         "FROM deliveries;"
       + DELIVERIES.format(name="deliveries_3")
       + f"INSERT INTO deliveries_3({_COLUMNS}) SELECT {_COLUMNS} FROM deliveries;"
         "DROP TABLE deliveries;"
         "ALTER TABLE deliveries_3 RENAME TO deliveries;"
       + DELIVERIES_DUE,
    # deliveries_due led by time had every look walk the due deliveries of destinations it did
    # not ask for (a dead receiver's backlog); now it is led by destination. (The schema-3 step
    # above builds the new form already: a file it migrates goes through this one too, with an
    # index to drop and build again; cheap next to that step's copy.)
    3: "DROP INDEX deliveries_due;" + DELIVERIES_DUE,
}
