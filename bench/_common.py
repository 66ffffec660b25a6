"""Shared bench plumbing: start/stop processes by PID, run the load generator, print tables."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {timeout}s")


@contextmanager
def process(args: Sequence[str], port: int, log: Path, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[Any]]:
    """Start a server process, wait for its port, and always stop it by PID."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})})
    try:
        wait_for_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def relay(config: dict[str, Any], workdir: Path) -> Iterator[tuple[subprocess.Popen[Any], int]]:
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "listen": f"127.0.0.1:{port}",
                                   "log_level": "warning"}}
    path = workdir / "relay.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with process([PY, "-m", "relay", "serve", "-c", str(path)], port, workdir / "relay.log",
                 cwd=workdir) as proc:
        yield proc, port


BACKENDS = ("sqlite", "postgres")


def backends_arg(parser: Any) -> None:
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="both",
                        help="spool backend(s) to measure, side by side (default: both)")


@contextmanager
def spools(choice: str, workdir: Path, servers: list[Any] | None = None
           ) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """(backend name, spool config section) for each backend asked for; PostgreSQL is a real
    server (pgserver, as in the tests) started here on a unix socket and stopped after. Its
    ``tests.pg.PgServer`` is appended to ``servers`` if given (for its pid)."""
    names = BACKENDS if choice == "both" else (choice,)
    found = [(name, {"path": str(workdir / f"{name}.db")}) for name in names if name == "sqlite"]
    if "postgres" not in names:
        yield found
        return
    sys.path.insert(0, str(ROOT))
    from tests.pg import PgServer

    base = Path(tempfile.mkdtemp(prefix="relay-bench-pg-"))
    base.chmod(0o755)
    server = PgServer(base / "pgdata")
    if servers is not None:
        servers.append(server)
    try:
        postgres = {"backend": "postgres",
                    "postgres": {"dsn": server.new_database(), "schema": "relay"}}
        yield [*found, ("postgres", postgres)]
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def bare_server() -> Iterator[tuple[subprocess.Popen[Any], int]]:
    """aiohttp + uvloop answering 202 without validating or storing: the ceiling."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, \
            process([PY, str(BENCH / "_bare.py"), str(port)], port, Path(tmp) / "bare.log") as proc:
        yield proc, port


@contextmanager
def floor_server(fan_out: int, target: str | None = None, writer: str = "process"
                 ) -> Iterator[tuple[subprocess.Popen[Any], int]]:
    """bench/_floor.py on a fresh SQLite file: a lean durable relay on this stack (durable 202,
    one delivery row per destination; with ``target``, each event sent from memory and its
    outcome recorded), its writer a ``process`` or a ``thread``."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = [PY, str(BENCH / "_floor.py"), str(port), str(Path(tmp) / "floor.db"), str(fan_out),
                *([target] if target else []), "--writer", writer]
        with process(args, port, Path(tmp) / "floor.log") as proc:
            yield proc, port


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (the relay's spool writer; with server.workers, the
    workers and theirs), from /proc."""
    found, todo = [], [pid]
    while todo:
        one = todo.pop()
        found.append(one)
        try:
            for task in Path(f"/proc/{one}/task").iterdir():
                with open(task / "children") as listing:
                    todo += [int(child) for child in listing.read().split()]
        except FileNotFoundError:
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process and all its live descendants, from
    /proc: the figure of merit that machine noise does not move much."""
    return sum(_stat_cpu(Path(f"/proc/{one}/stat")) for one in process_tree(pid))


def thread_cpu(pid: int) -> float:
    """User + system CPU seconds of a process's main thread: an aiohttp server's event loop
    (its other threads and child processes are not in it)."""
    return _stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat"))


def _stat_cpu(stat: Path) -> float:
    """utime + stime of a /proc stat file, in seconds (0 for a process gone)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def occupancy(pid: int) -> Iterator[dict[str, float]]:
    """How busy the machine was while the block ran, each in shares of one core: ``loop`` the
    server's main thread (its event loop), ``rest`` every other thread and process of it (the
    relay's spool writer and reader threads), ``load`` the children this script waited for
    meanwhile (wrk). A loop well under 1.0 while requests wait is waiting itself (for its
    writer's answers), not short of CPU, unless the three together fill the machine's cores.
    Also ``cpu``: the CPU seconds of the server's whole tree. Filled in when the block ends."""
    shares: dict[str, float] = {}
    wall, loop, tree = time.monotonic(), thread_cpu(pid), cpu_seconds(pid)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    yield shares
    wall = time.monotonic() - wall
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    shares["cpu"] = cpu_seconds(pid) - tree
    shares["loop"] = (thread_cpu(pid) - loop) / wall
    shares["rest"] = max(0.0, shares["cpu"] / wall - shares["loop"])
    shares["load"] = (done.ru_utime - kids.ru_utime + done.ru_stime - kids.ru_stime) / wall


def busy_line(name: str, shares: dict[str, float]) -> str:
    """``relay: event loop 88 %, its other threads and processes 47 %, load generator 14 %:
    149 % of 200 %``."""
    total = shares["loop"] + shares["rest"] + shares["load"]
    return (f"{name}: event loop {shares['loop'] * 100:.0f} %, its other threads and "
            f"processes {shares['rest'] * 100:.0f} %, load generator "
            f"{shares['load'] * 100:.0f} %: {total * 100:.0f} % of {(os.cpu_count() or 1) * 100} %")


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def load(port: int, *, batch: int, connections: int, seconds: float, prefix: str) -> dict[str, float]:
    """POST /v1/events with unique event ids; returns requests/s, events/s, p50/p99 ms."""
    if not wrk_available():
        raise SystemExit("bench needs wrk (Debian package 'wrk'): apt-get install -y wrk")
    env = {**os.environ, "BATCH": str(batch), "PREFIX": prefix}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s",
         str(BENCH / "events.lua"), f"http://127.0.0.1:{port}/v1/events"],
        capture_output=True, text=True, env=env, timeout=seconds + 60, check=True).stdout
    found = re.search(r"RESULT (.*)", out)
    if not found:
        raise RuntimeError(f"wrk printed no RESULT line:\n{out}")
    fields = dict(item.split("=") for item in found.group(1).split())
    requests, duration = int(fields["requests"]), int(fields["duration_us"]) / 1e6
    return {
        "req_s": requests / duration,
        "events_s": requests * batch / duration,
        "p50_ms": int(fields["p50_us"]) / 1000,
        "p99_ms": int(fields["p99_us"]) / 1000,
        "errors": int(fields["non2xx"]) + int(fields["sockerr"]),
        "requests": requests,
        "events": requests * batch,
    }


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"
