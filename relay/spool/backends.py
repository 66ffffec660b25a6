"""Open the spool backend that ``spool.backend`` names: SQLite (default) or PostgreSQL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.errors import SpoolError

if TYPE_CHECKING:
    from relay.config.schema import SpoolConfig
    from relay.spool import Spool
    from relay.spool.postgres import PostgresSpool

LEASE_MARGIN = 30.0  # a claim outlives one attempt (delivery.timeout) by this much


def open_spool(config: SpoolConfig, *, delivery_timeout: float = 90.0,
               writer_socket: str | None = None) -> Spool | PostgresSpool:
    """The configured spool, not yet opened (the caller awaits ``open()`` and ``close()``).

    ``writer_socket``: a worker of server.workers > 1 uses the supervisor's SQLite writer there.

    ``delivery_timeout`` (delivery.timeout) sets the default PostgreSQL lease: a delivery
    claimed by a replica stays its own for one attempt plus ``LEASE_MARGIN``.
    """
    if config.backend == "postgres":
        pg = config.postgres
        if pg.dsn is None:
            raise SpoolError("spool.postgres.dsn is required for spool.backend postgres")
        try:
            from relay.spool.postgres import PostgresSpool
        except ImportError as exc:  # asyncpg is the optional extra relay[postgres]
            raise SpoolError(f"spool.backend postgres needs asyncpg (pip install "
                             f"'relay[postgres]'): {exc}") from exc
        return PostgresSpool(pg.dsn.get_secret_value(), schema=pg.schema_, pool_size=pg.pool_size,
                             lease=pg.lease or delivery_timeout + LEASE_MARGIN,
                             max_events=config.max_events, dedupe_window=config.dedupe_window)
    from relay.spool import Spool
    return Spool(config.path, max_events=config.max_events, max_bytes=config.max_bytes,
                 dedupe_window=config.dedupe_window, writer_socket=writer_socket)
