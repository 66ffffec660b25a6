"""server.workers > 1: one supervisor process and that many worker processes, using every core.

The supervisor is ``relay serve`` itself. It holds the port, and with SQLite the spool's one
writer process; it starts the workers (``relay serve`` again, told their role in the
environment), starts one again when it dies, forwards SIGHUP, and on SIGTERM/SIGINT drains them
all before it stops the writer. Each worker is a whole relay with its own listening socket on
server.listen (SO_REUSEPORT): the kernel spreads new connections over the workers.

- PostgreSQL: the workers are replicas (docs/replicas.md). Each ingests and delivers; claims
  and host health are shared through the database.
- SQLite: every worker ingests through the supervisor's writer (one connection each; a group
  commit takes the jobs of all of them). Worker 0 alone delivers and prunes, because the SQLite
  spool has one queue; the writer wakes it when another worker stored events. The other workers
  answer /v1/hosts, /readyz and the 598 marker from the delivery state worker 0 publishes every
  ``PUBLISH_EVERY`` seconds.
- Metrics: prometheus-client's multiprocess mode over a private directory, so a scrape of any
  worker sees the whole relay (relay/metrics.py).

A worker dies with its supervisor (PR_SET_PDEATHSIG): a SIGKILLed relay leaves no worker
holding the port or the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import __version__
from relay.config import Config
from relay.config.lint import usable_cores
from relay.destinations import Loaded
from relay.errors import SpoolError
from relay.listener import cannot_listen
from relay.metrics import MULTIPROC_DIR
from relay.ratelimit import replica_share
from relay.spool.files import log_pending, private_spool_files

if TYPE_CHECKING:
    from relay.spool import Receipt, Spool

log = logging.getLogger("relay.workers")

ENV = "RELAY_WORKER"    # set by the supervisor for its workers only: the worker's Role as JSON
PUBLISH_EVERY = 0.5     # seconds between two snapshots of worker 0's delivery state (SQLite)
STALE_AFTER = 5.0       # a snapshot older than this is not used for readiness
START_TIMEOUT = 60.0    # for a worker to listen
STOP_GRACE = 10.0       # beyond server.drain_timeout, before a worker that will not stop is killed
RESTART_FIRST = 0.5     # seconds before a dead worker is started again, doubling ...
RESTART_MAX = 30.0      # ... up to this; a worker that ran this long starts from RESTART_FIRST
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Role:
    """What a worker is told by its supervisor."""

    index: int          # 0 .. count - 1; with SQLite, worker 0 delivers
    count: int
    port: int           # server.listen's port as bound (port 0 picks one for all workers)
    parent: int         # the supervisor's pid
    run_dir: str        # private (0700): the writer's socket, worker 0's delivery state
    ready_fd: int = -1  # written to once the worker listens

    @property
    def writer_socket(self) -> str:
        return os.path.join(self.run_dir, "writer.sock")

    @property
    def dispatch_state(self) -> str:
        return os.path.join(self.run_dir, "dispatch.json")

    def delivers(self, backend: str) -> bool:
        """Whether this worker runs a dispatcher (every one on PostgreSQL, worker 0 on SQLite)."""
        return backend == "postgres" or self.index == 0


def role_from_env() -> Role | None:
    """This process's Role when a supervisor started it, else None."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        return Role(**json.loads(raw))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"relay: {ENV} is set but is not a worker role ({exc}); it is set by "
                         "relay serve for its workers, unset it") from None


def become_worker(role: Role) -> None:
    """Die with the supervisor: SIGTERM when it exits, however it exits (Linux). A SIGHUP the
    supervisor passes on before this worker listens for it must not end it (the default)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != role.parent:   # it died before the line above took effect
        raise SystemExit("relay worker: the supervising relay is gone")


def say_ready(role: Role) -> None:
    """Tell the supervisor this worker listens."""
    if role.ready_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(role.ready_fd, b"R")
            os.close(role.ready_fd)


# -- worker 0's delivery state, for the other SQLite workers ------------------------------------

def dispatch_state(view: Any, names: Iterable[str]) -> dict[str, Any]:
    """What the API of a worker without a dispatcher reads of delivery (see DispatchView)."""
    now = time.time()
    return {"at": now, "in_flight": view.in_flight, "hosts": view.hosts(now),
            "not_ready": view.not_ready(), "held": {name: view.held(name) for name in names}}


async def publish_dispatch(view: Any, names: Callable[[], Iterable[str]], path: str) -> None:
    """Write the dispatcher's state to ``path`` every PUBLISH_EVERY seconds (worker 0)."""
    def write(data: bytes) -> None:
        part = f"{path}.{os.getpid()}"
        Path(part).write_bytes(data)
        os.replace(part, path)

    while True:
        data = json.dumps(dispatch_state(view, names()), default=str).encode()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(write, data)
        await asyncio.sleep(PUBLISH_EVERY)


class RemoteDispatch:
    """The DispatchView of a SQLite worker that does not deliver: worker 0's published state,
    at most PUBLISH_EVERY old. Metrics of attempts and hosts come from worker 0 itself."""

    remote = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._state: dict[str, Any] = {"at": 0.0, "in_flight": 0, "hosts": [],
                                       "not_ready": None, "held": {}}

    @property
    def in_flight(self) -> int:
        return int(self._state["in_flight"])

    def wake(self) -> None:
        """Nothing to do: the writer wakes worker 0 when this worker stores events."""

    def offer(self, receipt: Receipt) -> None:
        """Nothing to do: worker 0 reads what this worker stored when the writer wakes it."""

    def held(self, destination: str) -> dict[str, Any] | None:
        held: dict[str, Any] | None = self._state["held"].get(destination)
        return held

    def hosts(self, now: float) -> list[dict[str, Any]]:
        return list(self._state["hosts"])

    def not_ready(self) -> str | None:
        if time.time() - self._state["at"] > STALE_AFTER:
            return None   # worker 0 is restarting: this worker still takes events
        why: str | None = self._state["not_ready"]
        return why

    async def follow(self) -> None:
        while True:
            with contextlib.suppress(OSError, ValueError):
                raw = await asyncio.to_thread(Path(self.path).read_bytes)
                self._state = json.loads(raw)
            await asyncio.sleep(PUBLISH_EVERY)


# -- the supervisor ------------------------------------------------------------------------------

def _reserve_port(host: str, port: int, listen: str) -> socket.socket:
    """A socket bound to server.listen with SO_REUSEPORT, kept (not listening) for the
    supervisor's life: it fixes the port when it is 0, and first the port is checked free
    (binding without SO_REUSEPORT), so a second relay on it is refused as with one worker."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        if port:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        return sock
    except OSError as exc:
        raise cannot_listen(listen, port, exc) from exc


SOCKET_PATH_MAX = 100   # sun_path holds 108 bytes; "writer.sock" and a margin must fit


def _make_run_dir(config: Config) -> str:
    """A private (0700) directory for the writer's socket, worker 0's delivery state and the
    metrics files: in the temporary directory ($TMPDIR, /tmp), else /dev/shm (a container with
    a read-only root filesystem, as the Helm chart runs it), else beside the SQLite spool."""
    places: list[str | None] = [None, "/dev/shm"]
    if config.spool.backend == "sqlite":
        places.append(str(Path(config.spool.path).resolve().parent))
    tried = []
    for place in places:
        try:
            made = tempfile.mkdtemp(prefix="relay-", dir=place)
        except OSError as exc:
            tried.append(f"{place or 'the temporary directory'}: {exc.strerror or exc}")
            continue
        if len(os.path.join(made, "writer.sock")) <= SOCKET_PATH_MAX:
            return made
        os.rmdir(made)
        tried.append(f"{made}: too long a path for a unix socket")
    raise SystemExit("relay: server.workers needs a writable directory for its workers' "
                     f"sockets and metrics; tried {'; '.join(tried)}: set TMPDIR to one")


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


class _Slot:
    """One worker: its process, started again whenever it exits while the relay runs."""

    def __init__(self, role: Role, config_path: str) -> None:
        self.role = role
        self.config_path = config_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    async def start(self) -> bool:
        """Start the worker; True once it listens, False if it exited or hung first."""
        loop = asyncio.get_running_loop()
        read, write = os.pipe()
        # Each worker is its own replica in PostgreSQL's claims: RELAY_REPLICA_ID/w<index>.
        replica = os.environ.get("RELAY_REPLICA_ID") or f"{socket.gethostname()}:{self.role.parent}"
        env = {**os.environ, ENV: json.dumps(asdict(replace(self.role, ready_fd=write))),
               "RELAY_REPLICA_ID": f"{replica}/w{self.role.index}",
               # PostgreSQL: the destinations' rate limits are split over every worker of
               # every replica (SQLite: worker 0 alone delivers, it is not read)
               "RELAY_REPLICAS": str(replica_share() * self.role.count)}
        try:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - one fork/exec, like the writer's
                [sys.executable, "-m", "relay", "serve", "-c", self.config_path],
                env=env, pass_fds=[write], stdin=subprocess.DEVNULL)
        except OSError as exc:
            os.close(read)
            log.error("cannot start worker %d: %s", self.role.index, exc)
            return False
        finally:
            os.close(write)
        self.started = time.monotonic()
        said: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if not said.done():
                try:
                    said.set_result(os.read(read, 1))
                except OSError:
                    said.set_result(b"")

        loop.add_reader(read, readable)
        try:
            ready = await asyncio.wait_for(said, START_TIMEOUT) == b"R"
        except TimeoutError:
            log.error("worker %d (pid %d) did not listen within %.0fs; stopping it",
                      self.role.index, self.proc.pid, START_TIMEOUT)
            self.proc.kill()
            ready = False
        finally:
            loop.remove_reader(read)
            os.close(read)
        return ready

    async def keep(self) -> None:
        """Start the worker again each time it exits, after a backoff."""
        delay = RESTART_FIRST
        while True:
            proc = self.proc
            while proc is not None and proc.poll() is None:  # noqa: ASYNC110 - a child process
                await asyncio.sleep(0.1)
            if proc is not None:
                _forget(proc.pid)
                if time.monotonic() - self.started >= RESTART_MAX:
                    delay = RESTART_FIRST
                log.error("worker %d (pid %d) exited with %s; starting it again in %.1fs",
                          self.role.index, proc.pid, _exit_text(proc.returncode), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            if await self.start():
                log.warning("worker %d is running again (pid %d)", self.role.index,
                            self.proc.pid if self.proc else 0)

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)


def _forget(pid: int) -> None:
    """A dead worker's live gauges leave the metrics (its counters stay in the totals)."""
    path = os.environ.get(MULTIPROC_DIR)
    if path:
        from prometheus_client.multiprocess import mark_process_dead

        with contextlib.suppress(OSError):
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


async def _wait_exit(slots: list[_Slot], timeout: float) -> None:
    """Wait for every worker to exit, then kill those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(slot.proc is not None and slot.proc.poll() is None for slot in slots):
        if time.monotonic() > deadline:
            for slot in slots:
                if slot.proc is not None and slot.proc.poll() is None:
                    log.error("worker %d (pid %d) did not stop within %.0fs; killing it",
                              slot.role.index, slot.proc.pid, timeout)
                    slot.proc.kill()
            await asyncio.to_thread(lambda: [s.proc.wait() for s in slots if s.proc])
            break
        await asyncio.sleep(0.05)
    for slot in slots:
        if slot.proc is not None:
            _forget(slot.proc.pid)


async def supervise(loaded: Loaded, config_path: str) -> int:
    """Run server.workers workers until SIGTERM/SIGINT; returns the exit code."""
    config = loaded.config
    count = config.server.workers
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    slots: list[_Slot] = []

    def forward(signum: int) -> None:
        for slot in slots:
            slot.signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, forward, signal.SIGHUP)

    if count > (cores := usable_cores()):
        log.warning("server.workers is %d but the relay may use %d cores: the workers beyond "
                    "that only share them", count, cores)
    host, port = config.server.host_port
    reserved = _reserve_port(host, port, config.server.listen)
    port = reserved.getsockname()[1]
    run_dir = _make_run_dir(config)
    metrics_dir = os.path.join(run_dir, "metrics")
    os.mkdir(metrics_dir, 0o700)
    os.environ[MULTIPROC_DIR] = metrics_dir   # the workers inherit it before any import
    store = None
    keepers: list[asyncio.Task[None]] = []
    try:
        role = Role(index=0, count=count, port=port, parent=os.getpid(), run_dir=run_dir)
        if config.spool.backend == "sqlite":
            store = await _open_writer(config, role.writer_socket)
        slots[:] = [_Slot(replace(role, index=i), config_path) for i in range(count)]
        started = await asyncio.gather(*(slot.start() for slot in slots))
        if not all(started):
            failed = ", ".join(str(i) for i, ok in enumerate(started) if not ok)
            log.error("worker %s did not start (its error is above); stopping", failed)
            return 1
        where = config.spool.path if config.spool.backend == "sqlite" else \
            f"postgres, schema {config.spool.postgres.schema_}"
        log.info("relay %s listening on http://%s:%s (%d workers, spool %s, %d destinations)",
                 __version__, f"[{host}]" if ":" in host else host, port, count, where,
                 len(config.destinations))
        keepers = [asyncio.create_task(slot.keep()) for slot in slots]
        await stop.wait()
        log.info("shutting down: draining %d workers for up to %.0fs", count,
                 config.server.drain_timeout)
        return 0
    except SpoolError as exc:
        log.error("%s", exc)
        return 1
    finally:
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        forward(signal.SIGTERM)
        # a worker drains in two steps of up to server.drain_timeout each: requests in
        # flight, then delivery attempts in flight (relay/service.py)
        await _wait_exit(slots, 2 * config.server.drain_timeout + STOP_GRACE)
        if store is not None:
            await log_pending(store, config)
            await store.close()
            if store.listener is not None:
                store.listener.close()
        reserved.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("stopped")


async def _open_writer(config: Config, path: str) -> Spool:
    """The SQLite spool's writer, taking the workers' connections on ``path``."""
    from relay.spool import Spool

    private_spool_files(config.spool.path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(128)
    store = Spool(config.spool.path, max_events=config.spool.max_events,
                  max_bytes=config.spool.max_bytes, dedupe_window=config.spool.dedupe_window,
                  listener=listener)
    try:
        await store.open()
    except SpoolError:
        listener.close()
        raise
    return store
