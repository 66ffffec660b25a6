"""The spool as files and as a backlog, for the processes that own it (relay/service.py, and
the supervisor of server.workers, relay/workers.py): its files' mode, what is left at exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from pathlib import Path

from relay.config import Config
from relay.errors import SpoolError
from relay.spool.contract import SpoolBackend

log = logging.getLogger("relay")


async def log_pending(spool: SpoolBackend, config: Config) -> None:
    """Say what is left undelivered at exit: it waits in the spool for the next relay that
    opens it, and is lost if the spool goes with the pod (an emptyDir)."""
    try:
        pending = await spool.pending_by_destination()
    except SpoolError as exc:
        log.warning("cannot count the deliveries still pending: %s", exc)
        return
    total = sum(pending.values())
    if total and config.spool.backend == "sqlite" and \
            not await asyncio.to_thread(os.path.exists, config.spool.path):
        # (removed while the relay ran: relay.spool.store refused events since)
        log.error("stopping with %d deliveries pending in the spool file %s, which was "
                  "removed while the relay ran: a relay started again will not find them",
                  total, config.spool.path)
        return
    if total:
        where = (config.spool.path if config.spool.backend == "sqlite"
                 else "the PostgreSQL spool")
        log.warning("stopping with %d deliveries pending (%s); they stay in %s for the next "
                    "relay that opens it", total,
                    ", ".join(f"{name}: {n}" for name, n in sorted(pending.items())), where)


SPOOL_FILE_SUFFIXES = ("", "-wal", "-shm", ".lock")


def private_spool_files(path: str) -> None:
    """Make the spool's files readable by this user only (0600): they hold recipients'
    addresses. The database file is created 0600 before SQLite opens it (SQLite gives its
    ``-wal`` and ``-shm`` files the database file's mode); files an older relay left with
    group or other bits are tightened, with a warning."""
    if path == ":memory:" or path.startswith("file:"):
        return
    base = Path(path)
    with contextlib.suppress(OSError):  # the spool reports what is wrong with its path itself
        base.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(base, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in SPOOL_FILE_SUFFIXES:
        file = Path(path + suffix)
        try:
            found = file.stat()
            mode = found.st_mode & 0o777
            # (never a directory: a spool.path naming /tmp or a volume's mount point is refused
            # by the spool itself, and must not be locked to this user first)
            if stat.S_ISREG(found.st_mode) and mode & 0o077:
                file.chmod(mode & 0o700)
                log.warning("spool file %s was readable by others (mode %o); now %o",
                            file, mode, mode & 0o700)
        except OSError:
            continue
