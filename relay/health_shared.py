"""Host health shared by replicas through the PostgreSQL spool's ``hosts`` table.

``SharedHealth`` is the dispatcher's ``HealthBoard`` (same synchronous calls, same state
machine in relay/health.py) with three things moved into the database, so that several
replicas on one spool act as one relay:

* Consecutive failures are counted per host in the database: one ``UPDATE`` per failure (its
  answer says whether the count reached ``health.consecutive_failures``, and so whether this
  replica trips the host); a success resets the count only when it is not zero. The windowed
  failure rate stays per replica (the local board), and a suspension it decides is written
  for all. While this replica's own unanswered failures could bring the count it last saw to
  the threshold, or are ``UNCONFIRMED_MAX`` already, the host takes no new request from it
  (``_held``): a dead receiver answers faster than the database, and without this hold each
  replica would go on sending to it for as long as its failures wait in line.
* A suspension, decided by any replica, is polled into every replica's local board every
  ``POLL_EVERY`` seconds (polling, not LISTEN/NOTIFY: one small query, nothing to re-subscribe
  after the database restarts). A replica also learns it at once from the answer to its next
  failure statement.
* When a suspension ends, one replica claims the probe in the table (``probe_owner``, with a
  claim that ends after ``probe_lease``, so a replica that dies while probing passes it on);
  the others wait for its outcome.

No request waits on the database: the dispatcher's calls change the local board and queue the
statement; a lost database leaves each replica with its local board until it returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from relay.config import HealthConfig
from relay.errors import SpoolError
from relay.health import HealthBoard, Host, State

log = logging.getLogger("relay.health")

POLL_EVERY = 0.5  # seconds: a suspension decided elsewhere is honoured here within this
UNCONFIRMED_MAX = 4  # failures per host on their way to the table, at most, before it answers
LOCAL_NEVER = 2**31 - 1  # the local board never trips on consecutive failures: the table does

COLUMNS = ("key, state, version, consecutive, suspensions, total_suspensions, suspended_at, "
           "suspended_until, probe_owner, probe_until")

ALL = f"SELECT {COLUMNS} FROM hosts"
ONE = f"SELECT {COLUMNS} FROM hosts WHERE key = $1"
# One statement per failure; counted only while the host is healthy.
FAIL = f"""
INSERT INTO hosts AS h(key, consecutive) VALUES ($1, 1)
ON CONFLICT (key) DO UPDATE
SET consecutive = CASE WHEN h.state = 'healthy' THEN h.consecutive + 1 ELSE h.consecutive END
RETURNING {COLUMNS}
"""
RESET = f"UPDATE hosts SET consecutive = 0 WHERE key = $1 AND consecutive <> 0 RETURNING {COLUMNS}"
# Suspend a healthy host, or one whose probe this replica ($5) holds; the length grows with the
# suspensions in a row, as in HealthBoard._suspend.
SUSPEND = f"""
INSERT INTO hosts AS h(key, state, version, suspensions, total_suspensions, suspended_at,
                       suspended_until)
VALUES ($1::text, 'suspended', 1, 1, 1, $2::float8, $2 + least($3::float8, $4::float8))
ON CONFLICT (key) DO UPDATE
SET state = 'suspended', version = h.version + 1, consecutive = 0,
    suspensions = h.suspensions + 1, total_suspensions = h.total_suspensions + 1,
    suspended_at = $2, suspended_until = $2 + least($3 * (h.suspensions + 1), $4),
    probe_owner = NULL, probe_until = NULL
WHERE h.state = 'healthy' OR (h.state = 'probing' AND h.probe_owner = $5::text)
RETURNING {COLUMNS}
"""
CLAIM_PROBE = f"""
UPDATE hosts SET state = 'probing', version = version + 1, probe_owner = $3::text,
    probe_until = $2::float8 + $4::float8
WHERE key = $1 AND ((state = 'suspended' AND suspended_until <= $2)
                    OR (state = 'probing' AND probe_until <= $2))
RETURNING {COLUMNS}
"""
HEAL = f"""
UPDATE hosts SET state = 'healthy', version = version + 1, consecutive = 0, suspensions = 0,
       probe_owner = NULL, probe_until = NULL
WHERE key = $1 AND state = 'probing' AND probe_owner = $2
RETURNING {COLUMNS}
"""
ABANDON_PROBE = f"""
UPDATE hosts SET state = 'suspended', version = version + 1, suspended_until = $3::float8,
       probe_owner = NULL, probe_until = NULL
WHERE key = $1 AND state = 'probing' AND probe_owner = $2
RETURNING {COLUMNS}
"""


class HostStore(Protocol):
    """What SharedHealth needs of the spool (relay.spool.postgres.PostgresSpool)."""

    replica: str

    async def fetch_rows(self, query: str, *args: Any) -> list[Any]: ...


class SharedHealth(HealthBoard):
    """A HealthBoard whose suspensions, consecutive failures and probe are shared; see the
    module docstring."""

    def __init__(self, config: HealthConfig,
                 on_change: Callable[[Host, State, float], None] | None = None, *,
                 store: HostStore, probe_lease: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.replica = store.replica
        self.probe_lease = probe_lease
        self.clock = clock
        self.wake: Callable[[], None] = lambda: None    # the dispatcher's, set by the service
        self.shared: dict[str, dict[str, Any]] = {}     # key -> the table's row, last seen
        self._versions: dict[str, int] = {}
        self._probes: dict[str, bool] = {}              # key -> claim asked (False) / won (True)
        self._tasks: set[asyncio.Task[None]] = set()
        self._unconfirmed: dict[str, int] = {}         # key -> failures not yet answered
        self._holding: set[str] = set()                 # keys _held said were held
        super().__init__(config, on_change)

    @property
    def config(self) -> HealthConfig:
        """What the local state machine applies: the configured rules, except that it never
        trips on consecutive failures itself (the shared count does)."""
        return self._local

    @config.setter
    def config(self, value: HealthConfig) -> None:
        self.rules = value
        self._local = value.model_copy(update={"consecutive_failures": LOCAL_NEVER})

    # -- the dispatcher's calls ------------------------------------------------------------

    def allow(self, key: str, now: float, fresh: bool = True) -> bool:
        """As HealthBoard.allow, but the probe at the end of a suspension is claimed in the
        table first: the replica that wins it sends it; asking returns False meanwhile."""
        host = self.hosts.get(key)
        if host is None or host.state == "healthy":
            return not self._held(key)
        if host.state == "probing" or now < host.suspended_until:
            return False
        if self._probes.get(key):
            if super().allow(key, now, fresh):
                del self._probes[key]
                return True
            return False
        if key not in self._probes:
            self._probes[key] = False
            self._spawn(self._claim_probe(key, now))
        return False

    def is_blocked(self, key: str, now: float) -> bool:
        return super().is_blocked(key, now) or self._held(key)

    def _held(self, key: str) -> bool:
        """This replica's failures still on their way to the table could make the shared
        count reach ``consecutive_failures``, or are UNCONFIRMED_MAX already (the count seen
        here may be that much behind the other replicas'): wait for their answers before
        sending more."""
        if self._holds(key):
            self._holding.add(key)
            return True
        return False

    def _holds(self, key: str) -> bool:
        pending = self._unconfirmed.get(key)
        if not pending:
            return False
        seen = self.shared.get(key, {}).get("consecutive", 0)
        return pending >= UNCONFIRMED_MAX or seen + pending >= self.rules.consecutive_failures

    def _let_go(self) -> None:
        """Wake the dispatcher if a host it was told is held is not any more (the answers
        came, or the count seen here went down): nothing else would."""
        if self._holding and not all(self._holds(key) for key in self._holding):
            self._holding = {key for key in self._holding if self._holds(key)}
            self.wake()

    def record(self, key: str, failed: bool, now: float) -> None:
        host = self.host(key)
        before = host.state
        super().record(key, failed, now)
        if before == "probing":  # our probe's outcome
            if failed:
                self._spawn(self._write(key, SUSPEND, key, now, self.rules.suspend_for,
                                        self.rules.suspend_max, self.replica))
            else:
                self._spawn(self._write(key, HEAL, key, self.replica))
        elif before == "suspended":
            return
        elif host.state == "suspended":  # the local failure rate tripped it: for everyone
            self._spawn(self._write(key, SUSPEND, key, now, self.rules.suspend_for,
                                    self.rules.suspend_max, self.replica))
        elif failed:
            self._unconfirmed[key] = self._unconfirmed.get(key, 0) + 1
            self._spawn(self._count_failure(key, now))
        elif self.shared.get(key, {}).get("consecutive"):
            self._spawn(self._write(key, RESET, key))

    def abandon_probe(self, key: str, now: float) -> None:
        host = self.hosts.get(key)
        if host is not None and host.state == "probing":
            super().abandon_probe(key, now)
            self._spawn(self._write(key, ABANDON_PROBE, key, self.replica, now))

    def peek(self, key: str, now: float) -> dict[str, object]:
        """The host's snapshot with the shared state, count and suspension in it."""
        snap = super().peek(key, now)
        row = self.shared.get(key)
        if row is None:
            return snap
        state = row["state"]
        snap.update({
            "state": state, "consecutive_failures": row["consecutive"],
            "suspensions_in_a_row": row["suspensions"],
            "suspensions_total": row["total_suspensions"],
            "suspended_until": row["suspended_until"] if state != "healthy" else None,
            "suspended_for_s": round(max(0.0, row["suspended_until"] - now), 3)
            if state == "suspended" else 0.0,
            "probe_owner": row["probe_owner"], "shared": True})
        return snap

    # -- the table -------------------------------------------------------------------------

    async def follow(self) -> None:
        """Poll the table into the local board every POLL_EVERY seconds, until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(POLL_EVERY)

    async def refresh(self) -> None:
        """Read the whole table into the local board once."""
        try:
            rows = await self.store.fetch_rows(ALL)
        except SpoolError:
            return  # the spool reports a lost database; the local board goes on
        now = self.clock()
        for row in rows:
            self._apply(row, now)

    async def close(self) -> None:
        """Wait for the statements still on their way (each is short)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rows(self, query: str, *args: Any) -> list[Any] | None:
        try:
            return await self.store.fetch_rows(query, *args)
        except SpoolError as exc:
            log.debug("shared host health: %s", exc)
            return None

    async def _write(self, key: str, query: str, *args: Any) -> None:
        """Run a conditional statement; if it changed nothing, read the row as it is."""
        rows = await self._rows(query, *args)
        if rows == [] and query is not RESET:
            rows = await self._rows(ONE, key)
        for row in rows or ():
            self._apply(row, self.clock())

    async def _count_failure(self, key: str, now: float) -> None:
        """Count one failure in the table; trip the host if the count reached the threshold.
        Until then (the suspension written, or the count found short) it holds the host here."""
        try:
            rows = await self._rows(FAIL, key)
            if not rows:
                return
            (row,) = rows
            self._apply(row, self.clock())
            if row["state"] == "healthy" and \
                    row["consecutive"] >= self.rules.consecutive_failures:
                await self._write(key, SUSPEND, key, now, self.rules.suspend_for,
                                  self.rules.suspend_max, self.replica)
        finally:
            left = self._unconfirmed.pop(key, 1) - 1
            if left:
                self._unconfirmed[key] = left
            self._let_go()  # the dispatcher may send to it again

    async def _claim_probe(self, key: str, now: float) -> None:
        rows = await self._rows(CLAIM_PROBE, key, now, self.replica, self.probe_lease)
        if rows:
            self._probes[key] = True             # ours: the next allow() sends it
            self._versions[key] = rows[0]["version"]
            self.shared[key] = dict(rows[0])
            log.info("host %s: this replica sends the probe", key)
        else:
            self._probes.pop(key, None)
            await self._write(key, ONE, key)     # another replica has it, or it moved on
        self.wake()

    def _apply(self, row: Mapping[str, Any], now: float) -> None:
        """Bring the local board to the table's row, if the row is newer than what it knows."""
        key = row["key"]
        self.shared[key] = dict(row)
        if row["version"] <= self._versions.get(key, -1):
            self._let_go()  # the count seen here may have gone down
            return
        self._versions[key] = row["version"]
        state = row["state"]
        if state == "probing" and row["probe_owner"] == self.replica:
            return  # our own probe: the local board already knows
        self._probes.pop(key, None)
        host = self.host(key)
        host.suspensions, host.total_suspensions = row["suspensions"], row["total_suspensions"]
        if state == "healthy":
            if host.state != "healthy":
                host.results.clear()
                host.consecutive = 0
                self._move(host, "healthy", now)
        else:
            # Suspended, or probed by another replica: held here until its claim ends.
            host.suspended_at = row["suspended_at"]
            host.suspended_until = row["suspended_until"] if state == "suspended" \
                else row["probe_until"]
            if host.state != "suspended":
                self._move(host, "suspended", now)
        self.wake()


def shared_health(store: HostStore, *, probe_lease: float,
                  clock: Callable[[], float]) -> Callable[..., HealthBoard]:
    """The dispatcher's ``health`` factory for a spool shared by replicas."""
    def make(config: HealthConfig,
             on_change: Callable[[Host, State, float], None] | None = None) -> HealthBoard:
        return SharedHealth(config, on_change, store=store, probe_lease=probe_lease, clock=clock)
    return make
