"""The durable spool: every accepted event and each of its deliveries, in one SQLite file.

A writer process (writer.py) owns every write and runs *group commit*: it takes every job that
arrived while the previous transaction was committing and runs them all in one transaction, then
one fsync. Callers await a future that resolves only after COMMIT returns, so a 202 is never sent
for data that a SIGKILL could lose. Reads use a second connection on a reader thread (WAL lets
them run beside writes). The event loop never touches the disk (store.py).

A delivery row is the unit of work: (event, destination) with ``state`` (pending, delivered,
failed, skipped), ``attempts`` and ``not_before``. Retries are a new ``not_before``, written here;
nothing sleeps in memory waiting to retry.
"""

from relay.spool.ingest import IngestMixin
from relay.spool.log import LogMixin
from relay.spool.queue import QueueMixin
from relay.spool.records import Attempt, DeliveryRecord, Due, Ingested, Receipt
from relay.spool.writer import SCHEMA_VERSION


class Spool(IngestMixin, QueueMixin, LogMixin):
    """Durable store of events and deliveries; see the module docstring."""


__all__ = ["SCHEMA_VERSION", "Attempt", "DeliveryRecord", "Due", "Ingested", "Receipt", "Spool"]
