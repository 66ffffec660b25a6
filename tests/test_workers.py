"""server.workers > 1 with real processes: a supervisor, its workers on one port (SO_REUSEPORT),
one SQLite writer or a PostgreSQL database, a real receiver. Every worker serves; every event
acknowledged by any worker is delivered (exactly once while nothing dies, at least once when a
worker is SIGKILLed); a dead worker is started again; SIGTERM drains all of them; a SIGKILLed
supervisor takes its workers and writer with it, and nothing acknowledged is lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RelayProcess, event, eventually, http, process_gone, write_config
from tests.receiver import Answer, Receiver
from tests.replicas import replica_config
from tests.test_chaos import Senders, delivered

pytestmark = pytest.mark.slow


def workers_config(tmp_path: Path, receiver: Receiver, workers: int = 2, **extra: Any) -> Path:
    return write_config(
        tmp_path, server={"workers": workers, "drain_timeout": "5s"},
        delivery={"allowed_ports": [receiver.port], "backoff_initial": "50ms",
                  "backoff_max": "500ms", "max_retries": 50, "timeout": "2s"},
        destinations=[{"name": "a", "format": "braze", "url": f"{receiver.url}/a"}], **extra)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):   # a thread that just ended
            continue
    return found


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)


def role_of(pid: int) -> dict[str, Any]:
    role: dict[str, Any] = json.loads(environ(pid)["RELAY_WORKER"])
    return role


def workers_of(relay: RelayProcess) -> dict[int, int]:
    """worker index -> pid, from each child's environment (the writer has no role)."""
    assert relay.proc is not None
    found = {}
    for pid in children(relay.proc.pid):
        try:
            env = environ(pid)
        except (FileNotFoundError, ProcessLookupError):   # just exited
            continue
        if "RELAY_WORKER" in env:
            found[json.loads(env["RELAY_WORKER"])["index"]] = pid
    return found


def accepted_per_worker(relay: RelayProcess) -> dict[int, float]:
    """pid -> relay_events_accepted_total as that worker counted it (its multiprocess file)."""
    from prometheus_client.mmap_dict import MmapedDict

    (pid, *_) = workers_of(relay).values()
    directory = Path(environ(pid)["PROMETHEUS_MULTIPROC_DIR"])
    counts = {}
    for file in directory.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(file))
        counts[int(file.stem.split("_")[1])] = sum(
            value for key, value, *_ in values if '"relay_events_accepted_total"' in key)
    return counts


def post_each(relay: RelayProcess, events: list[dict[str, Any]]) -> None:
    """One request (one new connection) per event: the kernel spreads them over the workers."""
    for e in events:
        status, _, body = http("POST", relay.url + "/v1/events", e)
        assert status == 202, body


def test_two_sqlite_workers_share_the_port_and_deliver_each_event_once(tmp_path: Path) -> None:
    with Receiver() as receiver:
        relay = RelayProcess(workers_config(tmp_path, receiver), tmp_path / "relay.log").start()
        try:
            workers = workers_of(relay)
            assert sorted(workers) == [0, 1], relay.log()
            assert "listening on" in relay.log() and "2 workers" in relay.log()
            events = [event(i) for i in range(200)]
            post_each(relay, events)
            eventually(lambda: len(delivered(receiver, "/a")), lambda n: n >= 200, timeout=30,
                       what="200 events delivered")
            time.sleep(0.5)   # no late duplicate either
            got = delivered(receiver, "/a")
            assert set(got) == {e["message_id"] for e in events}
            assert max(got.values()) == 1, "a delivery was sent twice while nothing failed"
            # both workers took events (the writer stored them all, worker 0 delivered them)
            per_worker = accepted_per_worker(relay)
            assert sum(per_worker.values()) == 200
            assert all(per_worker.get(pid, 0) > 0 for pid in workers.values()), per_worker
            # a scrape of any worker counts the whole relay
            for _ in range(4):
                status, _, text = http("GET", relay.url + "/metrics")
                assert status == 200 and "relay_events_accepted_total 200.0" in text, text
            # a worker without a dispatcher answers /v1/hosts from worker 0's state
            for _ in range(6):
                status, _, body = http("GET", relay.url + "/v1/hosts")
                assert status == 200 and [h["state"] for h in body["hosts"]] == ["healthy"]
            # the same event id posted again to any worker is a duplicate, not a new event
            for _ in range(6):
                status, _, body = http("POST", relay.url + "/v1/events", events[0])
                assert status == 200, body
        finally:
            relay.stop()


def test_a_sigkilled_worker_is_restarted_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    rng = random.Random(11)
    with Receiver(Answer(200, delay=0.02)) as receiver:
        relay = RelayProcess(workers_config(tmp_path, receiver), tmp_path / "relay.log").start()
        try:
            with Senders(relay, threads=4) as senders:
                for cycle in range(4):
                    eventually(lambda: len(senders.acked),
                               lambda n, want=50 * (cycle + 1): n >= want, timeout=60,
                               what="more acknowledged events")
                    time.sleep(rng.uniform(0.0, 0.5))
                    index = cycle % 2    # worker 1 (ingest only), then worker 0 (delivers)
                    before = workers_of(relay)
                    os.kill(before[index], signal.SIGKILL)
                    eventually(lambda i=index, old=before[index]: workers_of(relay).get(i),
                               lambda pid, old=before[index]: pid not in (None, old),
                               timeout=30, what=f"worker {index} started again")
                time.sleep(1.0)
            acked = set(senders.acked)
            assert set(senders.non_ok) <= {503}, dict(senders.non_ok)
            assert len(acked) > 200, "the load was too light to mean anything"
            wait_all_delivered_a(receiver, acked)
            assert relay.log().count("exited with signal SIGKILL; starting it again") == 4
            assert relay.proc is not None and relay.proc.poll() is None
        finally:
            relay.stop()


def wait_all_delivered_a(receiver: Receiver, acked: set[str], timeout: float = 60) -> None:
    eventually(lambda: len(acked - set(delivered(receiver, "/a"))), lambda n: n == 0,
               interval=0.2, timeout=timeout, what="every acknowledged event delivered")


def test_sigterm_drains_every_worker_and_exits_zero(tmp_path: Path) -> None:
    with Receiver(Answer(503)) as receiver:   # the deliveries stay pending
        relay = RelayProcess(workers_config(tmp_path, receiver), tmp_path / "relay.log").start()
        assert relay.proc is not None
        everyone = children(relay.proc.pid)
        assert len(everyone) == 3   # two workers and the writer
        run_dir = Path(role_of(workers_of(relay)[0])["run_dir"])
        assert run_dir.is_dir() and (run_dir / "writer.sock").exists()
        post_each(relay, [event(i) for i in range(10)])
        assert relay.kill(signal.SIGTERM) == 0
        for pid in everyone:
            eventually(lambda p=pid: process_gone(p), timeout=10, what=f"pid {pid} gone")
        log = relay.log()
        assert "stopping with 10 deliveries pending (a: 10)" in log, log
        assert log.count("stopped") >= 3
        assert not run_dir.exists(), "the supervisor's private directory was left behind"
        # the next relay (one worker) finds them and delivers them
        receiver.set_default(Answer(200))
        single = write_config(tmp_path, delivery={"allowed_ports": [receiver.port]},
                              destinations=[{"name": "a", "format": "braze",
                                             "url": f"{receiver.url}/a"}])
        relay = RelayProcess(single, tmp_path / "relay2.log").start()
        try:
            wait_all_delivered_a(receiver, {f"msg-{i}" for i in range(10)})
        finally:
            relay.stop()


def test_sigkilled_supervisor_takes_its_workers_and_loses_nothing(tmp_path: Path) -> None:
    with Receiver(Answer(200, delay=0.05)) as receiver:
        config = workers_config(tmp_path, receiver)
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            assert relay.proc is not None
            with Senders(relay, threads=4) as senders:
                eventually(lambda: len(senders.acked), lambda n: n >= 150, timeout=60,
                           what="150 acknowledged events")
                everyone = children(relay.proc.pid)
                relay.kill(signal.SIGKILL)
                for pid in everyone:   # PR_SET_PDEATHSIG, and the writer sees its socket close
                    eventually(lambda p=pid: process_gone(p), timeout=30, what=f"pid {pid} gone")
                relay.start()
                eventually(lambda: len(senders.acked), lambda n: n >= 300, timeout=60,
                           what="more acknowledged events after the restart")
            acked = set(senders.acked)
            assert set(senders.non_ok) <= {503}, dict(senders.non_ok)
            wait_all_delivered_a(receiver, acked)
        finally:
            relay.stop()


def test_second_relay_on_the_same_port_is_refused(tmp_path: Path) -> None:
    with Receiver() as receiver:
        (tmp_path / "one").mkdir()
        (tmp_path / "two").mkdir()
        first = RelayProcess(workers_config(tmp_path / "one", receiver),
                             tmp_path / "one.log").start()
        try:
            port = first.url.rsplit(":", 1)[1]
            second = workers_config(tmp_path / "two", receiver)
            text = second.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}")
            second.write_text(text)
            done = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(second)],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode != 0
            assert f"port {port} is already in use" in done.stderr + done.stdout
        finally:
            first.stop()


@pytest.mark.parametrize("value, problem", [(0, "greater than or equal to 1"),
                                            (65, "less than or equal to 64"),
                                            ("two", "whole number")])
def test_bad_workers_value_names_the_key(tmp_path: Path, value: Any, problem: str) -> None:
    config = write_config(tmp_path, server={"workers": value})
    done = subprocess.run([sys.executable, "-m", "relay", "check-config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "server.workers" in done.stderr and problem in done.stderr, done.stderr


def test_postgres_workers_are_replicas_and_deliver_each_event_once(tmp_path: Path,
                                                                   pg_dsn: str) -> None:
    with Receiver() as receiver:
        config = replica_config(tmp_path, pg_dsn, receiver,
                                server={"workers": 2, "drain_timeout": "5s"})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            workers = workers_of(relay)
            assert relay.proc is not None and sorted(workers) == [0, 1]
            assert len(children(relay.proc.pid)) == 2, "on PostgreSQL there is no writer"
            assert {environ(pid)["RELAY_REPLICA_ID"][-3:] for pid in workers.values()} == \
                {"/w0", "/w1"}, "each worker is its own replica in the claims"
            assert {environ(pid)["RELAY_REPLICAS"] for pid in workers.values()} == {"2"}, \
                "rate limits are split over both workers"
            events = [event(i) for i in range(150)]
            post_each(relay, events)
            eventually(lambda: len(delivered(receiver, "/a")), lambda n: n >= 150, timeout=30,
                       what="150 events delivered")
            time.sleep(1.0)
            got = delivered(receiver, "/a")
            assert set(got) == {e["message_id"] for e in events}
            assert Counter(got.values()) == Counter({1: 150}), "a delivery was sent twice"
            per_worker = accepted_per_worker(relay)
            assert all(per_worker.get(pid, 0) > 0 for pid in workers.values()), per_worker
            assert relay.kill(signal.SIGTERM) == 0
        finally:
            relay.stop()


def test_sighup_reloads_every_worker(tmp_path: Path) -> None:
    with Receiver() as receiver:
        config = workers_config(tmp_path, receiver)
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            assert relay.proc is not None
            config.write_text(config.read_text().replace("max_retries: 50", "max_retries: 7")
                              .replace("workers: 2", "workers: 3"))
            relay.proc.send_signal(signal.SIGHUP)
            def reloaded() -> set[int]:
                lines = [json.loads(line) for line in relay.log().splitlines()
                         if line.startswith("{")]
                return {line["worker"] for line in lines
                        if line["message"].startswith("config reloaded (SIGHUP)")}

            eventually(reloaded, lambda workers: workers == {0, 1}, timeout=20,
                       what="both workers to reload on the supervisor's SIGHUP")
            assert relay.log().count("server.workers takes effect only after a restart") == 2
        finally:
            relay.stop()


def test_without_a_writable_tmp_the_private_directory_goes_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only root filesystem (the Helm chart's) has no writable /tmp: /dev/shm, else the
    spool's folder, holds the writer's socket and the metrics; with none, a clear error."""
    import tempfile

    from relay.config import load_config
    from relay.workers import _make_run_dir

    config = load_config(write_config(tmp_path, server={"workers": 2}), env={})
    real = tempfile.mkdtemp
    refused: list[str | None] = []

    def mkdtemp(prefix: str = "", dir: str | None = None) -> str:
        if dir in refused:
            raise PermissionError(13, "Read-only file system")
        return real(prefix=prefix, dir=dir)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    refused[:] = [None]
    made = _make_run_dir(config)
    assert made.startswith("/dev/shm/relay-") or not Path("/dev/shm").is_dir()
    Path(made).rmdir()
    refused[:] = [None, "/dev/shm"]
    made = _make_run_dir(config)
    assert Path(made).parent == tmp_path and oct(Path(made).stat().st_mode & 0o777) == "0o700"
    Path(made).rmdir()
    refused[:] = [None, "/dev/shm", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"Read-only file system.*set TMPDIR"):
        _make_run_dir(config)


def test_more_workers_than_cores_is_a_warning_not_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"workers": (os.cpu_count() or 1) + 1})
    done = subprocess.run([sys.executable, "-m", "relay", "check-config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "server.workers" in done.stdout + done.stderr
    assert "cores" in done.stdout + done.stderr
