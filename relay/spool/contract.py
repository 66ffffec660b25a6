"""What each consumer needs from the spool, as Protocols: the seam between backends.

The server ingests (IngestStore), the dispatcher works the queue (WorkQueue), the API reads the
activity log (ActivityLog). ``relay.spool.Spool`` (SQLite) and
``relay.spool.postgres.PostgresSpool`` both satisfy all three (tests/test_spool_contract.py).
The list cursor (``after``) is a delivery's ``seq``: opaque to callers, who pass back the
``seq`` of the last record they got.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from relay.spool.records import Attempt, DeliveryRecord, Due, DueBatch, Ingested, Receipt

if TYPE_CHECKING:
    from relay.events import Accepted
    from relay.routing import Route


class Lifecycle(Protocol):
    is_open: bool

    @property
    def writable(self) -> bool: ...
    @property
    def unavailable(self) -> str | None:
        """Why the spool cannot take writes now (for /readyz), or None."""
        ...
    async def open(self) -> None: ...
    async def close(self) -> None: ...


class IngestStore(Lifecycle, Protocol):
    async def ingest_receipt(self, events: Sequence[tuple[Accepted, Sequence[Route]]]) -> Receipt: ...
    async def ingest(self, events: Sequence[tuple[Accepted, Sequence[Route]]]) -> list[Ingested]: ...
    async def stats(self) -> dict[str, int]: ...


class WorkQueue(Protocol):
    async def due(self, now: float, limit: int, destinations: Sequence[str],
                  exclude: Collection[int] = (), budget: int = ...) -> list[Due]: ...
    async def poll(self, now: float, limit: int, destinations: Sequence[str],
                   exclude: Collection[int] = ()) -> DueBatch: ...
    async def next_due_at(self, destinations: Sequence[str],
                          exclude: Collection[int] = ()) -> float | None: ...
    async def record_attempt(self, due: Due, attempt: Attempt, *, state: str,
                             not_before: float | None, failures: int,
                             reason: str | None) -> None: ...
    async def add_held(self, destinations: Sequence[str], seconds: float) -> int: ...
    async def pending_by_destination(self) -> dict[str, int]: ...


class ActivityLog(Protocol):
    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None: ...
    async def list_deliveries(self, *, state: str | None = None, destination: str | None = None,
                              after: int = 0, limit: int = 100) -> list[DeliveryRecord]: ...
    async def attempts_of(self, seqs: Sequence[int]) -> dict[int, list[Attempt]]: ...
    async def event_json(self, delivery_id: str) -> str | None: ...
    async def replay(self, *, delivery_ids: Sequence[str] = (), destination: str | None = None,
                     failed_since: float | None = None) -> list[str]: ...
    async def counts(self) -> dict[str, int]: ...
    async def oldest_due(self, now: float) -> float | None: ...
    async def prune(self, retention: float) -> int: ...


class SpoolBackend(IngestStore, WorkQueue, ActivityLog, Protocol):
    """Everything: what open_spool returns."""


if TYPE_CHECKING:  # both backends satisfy the whole seam (checked by mypy)
    from relay.spool import Spool
    from relay.spool.postgres import PostgresSpool

    def _sqlite(s: Spool) -> SpoolBackend:
        return s

    def _postgres(s: PostgresSpool) -> SpoolBackend:
        return s
