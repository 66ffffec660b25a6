"""The durable spool: every accepted event and each of its deliveries, in one SQLite file.

A writer process (writer.py, commit.py) owns every write and runs *group commit*: it takes every
job that arrived while the previous transaction was committing and runs them all in one
transaction, then one fsync. Callers await a future that resolves only after COMMIT returns, so a
202 is never sent for data that a SIGKILL could lose. Reads use a second connection on a reader
thread (WAL lets them run beside writes). The event loop never touches the disk (store.py).

A delivery row is the unit of work: (event, destination) with ``state`` (pending, delivered,
failed, skipped), ``attempts`` and ``not_before``. Retries are a new ``not_before``, written here;
nothing sleeps in memory waiting to retry.

The package holds two sides. The relay's (asyncio): api.py (Spool), store.py, ingest.py,
queue.py, log.py, records.py, files.py. The writer process's (stdlib only): writer.py, commit.py,
sqlite_schema.py, sql.py, receipt.py, and wire.py which both sides share. This ``__init__``
imports nothing until a name is asked for (PEP 562 ``__getattr__``), so the writer can import
its modules without loading the relay's side; it must stay that way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.spool.api import Spool
    from relay.spool.records import Attempt, DeliveryRecord, Due, Ingested, Receipt
    from relay.spool.sqlite_schema import SCHEMA_VERSION

_EXPORTS = {
    "Spool": "relay.spool.api", "Attempt": "relay.spool.records",
    "DeliveryRecord": "relay.spool.records", "Due": "relay.spool.records",
    "Ingested": "relay.spool.records", "Receipt": "relay.spool.records",
    "SCHEMA_VERSION": "relay.spool.sqlite_schema"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value   # asked once: later lookups do not come here
    return value


__all__ = ["SCHEMA_VERSION", "Attempt", "DeliveryRecord", "Due", "Ingested", "Receipt", "Spool"]
