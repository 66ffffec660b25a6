"""A real PostgreSQL for the tests, started by the test suite itself (PyPI ``pgserver``: the
server's binaries ship in the wheel; no system packages).

``pg_server`` (session scope) starts one server in a temporary directory, listening only on a
unix socket, and stops it at the end; ``pg_dsn`` gives each test a database of its own. The
server can be stopped and started again under a test (``PgServer.stop`` / ``start``).
Import the fixtures into a test module: ``from tests.pg import pg_dsn, pg_server``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

with warnings.catch_warnings():  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
    warnings.simplefilter("ignore")
    import pgserver
    from pgserver._commands import POSTGRES_BIN_PATH, pg_ctl
    from pgserver.utils import PostmasterInfo

START_TIMEOUT = 120  # crash recovery on a loaded 2-core machine can take more than pgserver's 10 s


class PgServer:
    """One PostgreSQL server (pgserver) in ``pgdata``; stopped by pg_ctl, i.e. by its pid."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.server = pgserver.get_server(pgdata, cleanup_mode="stop")
        self._names = itertools.count(1)
        self._socket_dir = self.server.get_postmaster_info().socket_dir

    def dsn(self, database: str = "postgres") -> str:
        return str(self.server.get_uri(database))

    def new_database(self) -> str:
        """A fresh, empty database; returns its DSN."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.server.psql(f"CREATE DATABASE {name};")
        return self.dsn(name)

    @property
    def pid(self) -> int | None:
        pid = self.server.get_pid()
        return int(pid) if pid is not None else None

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: as a crash, every connection cut, WAL replayed at
        start); returns once its processes are gone."""
        try:
            pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=self.server.system_user)
        except subprocess.CalledProcessError as exc:  # pg_ctl's reason is in the test's log
            status = subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata),
                                     "status"], capture_output=True, text=True, check=False)
            if status.returncode != 3:  # 3: not running, which is what stop is for
                raise RuntimeError(f"cannot stop PostgreSQL: {status.stdout}") from exc

    def start(self) -> None:
        """Start the stopped server again on the same socket; returns once it takes
        connections."""
        pg_ctl(["-w", "-t", str(START_TIMEOUT), "-o", '-h ""', "-o", f"-k {self._socket_dir}",
                "-l", str(self.server.log), "start"],
               pgdata=self.pgdata, user=self.server.system_user, timeout=START_TIMEOUT + 10)
        self.server._postmaster_info = PostmasterInfo.read_from_pgdata(self.pgdata)

    def close(self) -> None:
        self.server.cleanup()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL for the whole session, stopped at its end.

    Its data lives outside pytest's temporary folder: run as root, the server runs as the
    user ``pgserver``, which must be able to reach it, and pytest makes its own folder private
    (0700) again whenever a pytest session starts."""
    base = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    base.chmod(0o755)
    server = PgServer(base / "pgdata")
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """A DSN naming a database no other test uses."""
    return pg_server.new_database()
