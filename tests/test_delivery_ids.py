"""Delivery ids that name their row (SQLite schema 3): found without an index, made-up ids find
nothing, the seq in them is masked, and spool files of schemas 1 and 2 (whose ids name no row)
are migrated with their ids still found, replayed and pruned. On real spool files and writers."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from relay.errors import SpoolError
from relay.events import Event, accept
from relay.routing import Route
from relay.spool import Attempt, Spool, sqlite_schema
from relay.spool.delivery_ids import DeliveryIds
from relay.spool.wire import JobError
from tests.helpers import Clock

ROUTES = (Route("a", "pending"), Route("b", "pending"))

# The schema-2 file as relays before schema 3 made it (relay/spool/sqlite_schema.py at v2)
SCHEMA_2 = """
CREATE TABLE events(
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, sender_id INTEGER NOT NULL,
    received_at REAL NOT NULL, pending INTEGER NOT NULL, deliveries TEXT NOT NULL,
    body TEXT NOT NULL, size INTEGER NOT NULL DEFAULT 0);
CREATE INDEX events_by_sender_id ON events(id) WHERE sender_id = 1;
CREATE INDEX events_by_time ON events(received_at);
CREATE TABLE deliveries(
    seq INTEGER PRIMARY KEY, delivery_id TEXT NOT NULL UNIQUE,
    event_seq INTEGER NOT NULL REFERENCES events(seq), destination TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0, first_attempt_at REAL,
    held REAL NOT NULL DEFAULT 0, not_before REAL NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, reason TEXT);
CREATE INDEX deliveries_due ON deliveries(not_before, seq) WHERE state = 'pending';
CREATE TABLE attempts(
    delivery_seq INTEGER NOT NULL, n INTEGER NOT NULL, at REAL NOT NULL, duration REAL,
    status_code INTEGER, error TEXT, excerpt TEXT, PRIMARY KEY (delivery_seq, n)) WITHOUT ROWID;
PRAGMA user_version=2;
"""
OLD_PENDING = "dlv_0193a0b0c0d11111111111111111111111"[:35]
OLD_FAILED = "dlv_0193a0b0c0d22222222222222222222222"[:35]
BODY = '{"id":"e1","channel":"email","status":"sent","message_id":"m1"}'


def item(i: int, routes: tuple[Route, ...] = ROUTES, at: float = 1000.0):
    return accept(Event(id=f"e{i}", channel="email", status="sent", message_id=f"m{i}"), at), routes


def old_spool(path: Path, version: int) -> None:
    """A spool file of ``version`` (1 or 2) holding event e1 with a pending delivery to "a" and
    a failed one to "b" (one attempt), ids in the old 35-character form."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_2)
    conn.execute("INSERT INTO events VALUES (1, 'e1', 1, 1000.0, 1, ?, ?, ?)",
                 (f"a {OLD_PENDING} pending|b {OLD_FAILED} pending", BODY, len(BODY)))
    conn.execute("INSERT INTO deliveries(seq, delivery_id, event_seq, destination, state, "
                 "attempts, failures, first_attempt_at, not_before, created_at, updated_at, "
                 "reason) VALUES (1, ?, 1, 'a', 'pending', 0, 0, NULL, 1000.0, 1000.0, 1000.0, "
                 "NULL), (2, ?, 1, 'b', 'failed', 1, 0, 1000.5, 1000.0, 1000.0, 1000.5, "
                 "'HTTP 400')", (OLD_PENDING, OLD_FAILED))
    conn.execute("INSERT INTO attempts VALUES (2, 1, 1000.5, 0.01, 400, NULL, 'bad')")
    if version == 1:
        conn.executescript("ALTER TABLE events DROP COLUMN size; PRAGMA user_version=1;")
    conn.commit()
    conn.close()


@contextmanager
def write_locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the spool file's write lock (WAL mode) for the block: a
    writer's migration, or its setting up of a new file, waits on it."""
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("BEGIN IMMEDIATE")
        yield holder
    finally:
        holder.close()


def unique_indexes(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[1] for row in conn.execute("PRAGMA index_list(deliveries)") if row[2]]
    finally:
        conn.close()


@pytest.fixture
async def spool(tmp_path: Path):
    s = Spool(tmp_path / "spool.db", clock=Clock())
    await s.open()
    yield s
    await s.close()


async def test_new_ids_find_their_delivery_with_no_index_on_them(spool: Spool,
                                                                 tmp_path: Path) -> None:
    """Every id a receipt names finds its delivery and event; the deliveries table has no
    unique index (the cost this schema removes); ids keep their 35-character form."""
    receipt = await spool.ingest([item(i) for i in range(5)])
    ids = [did for ingested in receipt for _, did, _ in ingested.deliveries]
    assert len(set(ids)) == 10
    assert all(len(did) == 35 and did.startswith("dlv_") for did in ids)
    for ingested in receipt:
        for destination, did, _ in ingested.deliveries:
            record = await spool.get_delivery(did)
            assert record is not None
            assert (record.delivery_id, record.event_id, record.destination) == \
                (did, ingested.id, destination)
            assert f'"id":"{ingested.id}"' in (await spool.event_json(did) or "")
    assert unique_indexes(tmp_path / "spool.db") == []


async def test_made_up_ids_find_nothing_and_replay_nothing(spool: Spool) -> None:
    """An id whose masked seq names a real row but whose other digits differ is refused (the
    whole id must match); so are ids of any other shape. No id raises."""
    await spool.ingest([item(1, routes=(Route("a", "pending"),))])
    (due,) = await spool.due(2000.0, 10, ["a"])
    await spool.record_attempt(due, Attempt(1000.0, 0.1, 400, None, "no"), state="failed",
                               not_before=None, failures=0, reason="HTTP 400")
    real = due.delivery_id
    flipped_time = real[:5] + ("0" if real[5] != "0" else "1") + real[6:]
    flipped_seq = real[:-1] + ("0" if real[-1] != "0" else "1")
    flipped_salt = real[:20] + ("0" if real[20] != "0" else "1") + real[21:]
    made_up = [flipped_time, flipped_salt, flipped_seq, real.upper(), real + "0", real[:34],
               "dlv_", "", "x" * 10_000, "dlv_" + "f" * 31, "dlv_" + "0" * 31,
               "dlv_" + "\u0661" * 31, "dlv_" + "-" * 31, "dlv_" + " " * 31, "' OR 1=1 --"]
    for did in made_up:
        assert await spool.get_delivery(did) is None, did
        assert await spool.event_json(did) is None, did
    assert await spool.replay(delivery_ids=made_up) == []
    assert (await spool.get_delivery(real)).state == "failed"
    assert await spool.replay(delivery_ids=[*made_up, real]) == [real]
    assert (await spool.get_delivery(real)).state == "pending"


def test_the_seq_in_an_id_is_enciphered_with_the_files_key() -> None:
    """Ids of consecutive events look unrelated, and without the file's key an id does not
    name its seq: a receiver cannot count a relay's deliveries from its Webhook-Ids. Every seq a
    SQLite INTEGER holds round-trips; ids are unique (a permutation) and 35 characters."""
    ids, other = DeliveryIds(b"k" * 16), DeliveryIds(b"j" * 16)
    events = [range(3 * e + 1, 3 * e + 4) for e in range(1000)]    # 3 deliveries each
    events += [range(2**40 - 1, 2**40 + 1), range(2**63 - 2, 2**63)]
    made = [ids.make("dlv_0193a0b0c0d", seqs) for seqs in events]
    flat = [did for event in made for did in event]
    assert [ids.seq_of(did) for did in flat] == [seq for seqs in events for seq in seqs]
    assert len(set(flat)) == len(flat) and {len(did) for did in flat} == {35}
    firsts = [int(event[0][15:31], 16) for event in made[:1000]]
    assert sum(abs(b - a) < 2**50 for a, b in itertools.pairwise(firsts)) < 3   # 2**-14 each
    assert sum(bin(a ^ b).count("1") < 12 for a, b in itertools.pairwise(firsts)) < 3
    assert not any(other.seq_of(did) == ids.seq_of(did) for did in flat)
    for tail in (f"{ids._encipher(2**63):016x}0000", f"{ids._encipher(2**63 - 1):016x}ffff"):
        assert ids.seq_of(f"dlv_0193a0b0c0d{tail}") == 0      # names no SQLite INTEGER
    assert ids.make("dlv_0193a0b0c0d", range(5, 5)) == []
    with pytest.raises(ValueError, match="at most 65536"):
        ids.make("dlv_0193a0b0c0d", range(1, 70_000))


def test_ids_stay_what_spool_files_already_hold() -> None:
    """For a given key and seq an id never changes: spool files hold the ids made so far, and
    the activity log and replays find a delivery by deciphering its id. (Ids made by the code
    of 6179786, before the formatting was made cheaper.)"""
    ids = DeliveryIds(bytes(range(16)))
    assert ids.make("dlv_0193a0b0c0d", range(1, 4)) == [
        "dlv_0193a0b0c0db20a922b8e3843980000", "dlv_0193a0b0c0db20a922b8e3843980001",
        "dlv_0193a0b0c0db20a922b8e3843980002"]
    assert ids.make("dlv_0193a0b0c0d", range(2**62, 2**62 + 2)) == [
        "dlv_0193a0b0c0d6ffd0e335262ecd10000", "dlv_0193a0b0c0d6ffd0e335262ecd10001"]
    many = ids.make("dlv_0193a0b0c0d", range(7, 77))   # past the places written once
    assert len(many) == 70 and many[69] == "dlv_0193a0b0c0dc08e9ec1c1f85fb10045"
    assert [ids.seq_of(did) for did in many] == list(range(7, 77))


@pytest.mark.parametrize("version", [1, 2])
async def test_an_older_spool_is_migrated_and_its_ids_still_work(tmp_path: Path,
                                                                 version: int) -> None:
    """A schema-1 or schema-2 file opens as schema 4: the unique index and the index of events
    by time are gone (deliveries_due is back, led by destination), its pending
    delivery comes back due with its old id and event, its failed one is found, shown with its
    attempt and replayed by its old id; new events continue the seqs with new ids; prune lets
    the old ids go with their deliveries."""
    path = tmp_path / "old.db"
    old_spool(path, version)
    clock = Clock()
    spool = Spool(path, clock=clock)
    await spool.open()
    try:
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
        assert conn.execute("SELECT size FROM events").fetchone()[0] == len(BODY)
        conn.close()
        assert unique_indexes(path) == []
        conn = sqlite3.connect(path)
        assert [row[1] for row in conn.execute("PRAGMA index_list(events)")] == \
            ["events_by_sender_id"]            # prune goes by seq now
        assert [row[1] for row in conn.execute("PRAGMA index_list(deliveries)")] == \
            ["deliveries_due"]
        assert [row[2] for row in conn.execute("PRAGMA index_info(deliveries_due)")] == \
            ["destination", "not_before", "seq"]
        conn.close()
        (due,) = await spool.due(2000.0, 10, ["a", "b"])
        assert (due.seq, due.delivery_id, due.event_json) == (1, OLD_PENDING, BODY)
        failed = await spool.get_delivery(OLD_FAILED)
        assert failed is not None and (failed.event_id, failed.state) == ("e1", "failed")
        assert [a.status_code for a in (await spool.attempts_of([failed.seq]))[failed.seq]] == [400]
        assert await spool.event_json(OLD_FAILED) == BODY
        assert await spool.replay(delivery_ids=[OLD_FAILED, OLD_PENDING]) == [OLD_FAILED]
        assert (await spool.get_delivery(OLD_FAILED)).state == "pending"

        (fresh,) = await spool.ingest([item(2, routes=(Route("a", "pending"),))])
        (_, new_id, _), = fresh.deliveries
        new = await spool.get_delivery(new_id)
        assert new is not None and new.seq == 3 and len(new_id) == 35

        for old in await spool.due(2000.0, 10, ["a", "b"]):
            await spool.record_attempt(old, Attempt(clock(), 0.1, 200, None, None),
                                       state="delivered", not_before=None, failures=0,
                                       reason=None)
        clock.now += 100_000
        assert await spool.prune(retention=60) == 1     # e1; e2 is the newest event
        assert await spool.get_delivery(OLD_FAILED) is None
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT COUNT(*) FROM legacy_delivery_ids").fetchone()[0] == 0
        conn.close()
        assert (await spool.get_delivery(new_id)).state == "delivered"
    finally:
        await spool.close()


async def test_each_spool_file_has_its_own_key(tmp_path: Path) -> None:
    """Two spool files mask seqs with different keys, and a relay restarted on a file reads
    its key again: ids it made before the restart are still found."""
    one, two = Spool(tmp_path / "1.db"), Spool(tmp_path / "2.db")
    for s in (one, two):
        await s.open()
    try:
        (a,), (b,) = [await s.ingest([item(1, routes=(Route("a", "pending"),))])
                      for s in (one, two)]
        keys = []
        for name in ("1.db", "2.db"):
            conn = sqlite3.connect(tmp_path / name)
            keys.append(DeliveryIds.of(conn))
            conn.close()
        one_id, two_id = a.deliveries[0][1], b.deliveries[0][1]
        assert keys[0].seq_of(one_id) == 1 == keys[1].seq_of(two_id)   # seq 1 in both files
        assert keys[1].seq_of(one_id) != 1 != keys[0].seq_of(two_id)   # each with its own key
    finally:
        for s in (one, two):
            await s.close()
    again = Spool(tmp_path / "1.db")
    await again.open()
    try:
        assert (await again.get_delivery(a.deliveries[0][1])) is not None
        assert (await again.get_delivery(b.deliveries[0][1])) is None
    finally:
        await again.close()


async def test_a_migration_longer_than_the_start_timeout_is_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Migrating a large spool can take longer than a writer may take to start (a million
    deliveries: seconds). The writer says it is migrating, the relay logs it and waits instead
    of killing it, which would roll the migration back on every start. Here the migration is
    held by another connection's write lock for three start timeouts."""
    monkeypatch.setattr("relay.spool.store.START_TIMEOUT", 1.0)
    path = tmp_path / "old.db"
    old_spool(path, 2)
    spool = Spool(path)
    opening: asyncio.Task[None] | None = None
    try:
        with write_locked(path) as holder:
            opening = asyncio.create_task(spool.open())
            await asyncio.sleep(3.0)
            assert not opening.done()
            assert "migrating the spool" in caplog.text and "from schema 2 to 4" in caplog.text
            assert "still migrating the spool" in caplog.text     # a line per start timeout
            holder.execute("ROLLBACK")
        await asyncio.wait_for(opening, 30)
        assert (await spool.get_delivery(OLD_FAILED)) is not None
    finally:
        if opening is not None and opening.done() and opening.exception() is None:
            await spool.close()
        elif opening is not None:
            opening.cancel()


async def test_a_writer_that_never_says_ready_still_times_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a migration under way the start timeout holds: a writer stuck before it is
    ready (here waiting for a write lock to set up a new file) is given up on, naming why."""
    monkeypatch.setattr("relay.spool.store.START_TIMEOUT", 1.0)
    path = tmp_path / "new.db"
    with write_locked(path) as holder:
        holder.execute("CREATE TABLE t(x)")
        with pytest.raises(SpoolError, match="no answer within 1s"):
            await Spool(path).open()


async def test_a_relay_stopped_while_the_spool_migrates_stops_its_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelling open() during a migration (the relay told to stop) kills the writer by its
    PID and leaves the spool closed, not a writer that comes up unowned later."""
    monkeypatch.setattr("relay.spool.store.START_TIMEOUT", 1.0)
    path = tmp_path / "old.db"
    old_spool(path, 2)
    spool = Spool(path)
    with write_locked(path):
        opening = asyncio.create_task(spool.open())
        await asyncio.sleep(1.5)
        assert spool._proc is not None and spool._migrating
        proc = spool._proc
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert proc.poll() is not None and spool._proc is None and not spool.writable


def test_a_migration_the_disk_cannot_hold_is_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """From schema 2 the deliveries table is copied: with less free disk than twice the file's
    size (and 64 MiB) the migration is refused before it starts, saying how much room it needs,
    and the file stays at schema 2."""
    path = tmp_path / "old.db"
    old_spool(path, 2)
    monkeypatch.setattr(sqlite_schema.shutil, "disk_usage",
                        lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))  # type: ignore[attr-defined]
    conn = sqlite_schema.connect(str(path))
    with pytest.raises(JobError, match=r"needs about 6\d MiB free on its disk, and 0 MiB are"):
        sqlite_schema.migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()
