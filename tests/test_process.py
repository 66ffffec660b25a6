"""The real relay process: durable on 202 across SIGKILL, clean exit on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import RelayProcess, event, eventually, http, process_gone, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    proc = RelayProcess(write_config(tmp_path), tmp_path / "relay.log")
    yield proc
    proc.stop()


def test_sigkill_right_after_202_loses_nothing(relay: RelayProcess, tmp_path: Path) -> None:
    """Every delivery acknowledged with 202 is still pending after kill -9 and a restart."""
    relay.start()
    acknowledged: dict[str, str] = {}   # delivery_id -> event id
    lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            ev = event(worker * 100_000 + i)
            try:
                status, _, body = http("POST", relay.url + "/v1/events", ev, timeout=5)
            except OSError:
                return  # the relay died under us: that request was never acknowledged
            if status == 202:
                with lock:
                    for d in body["events"][0]["deliveries"]:
                        acknowledged[d["delivery_id"]] = ev["id"]

    with ThreadPoolExecutor(8) as pool:
        for w in range(8):
            pool.submit(sender, w)
        try:   # keep posting until a good number are acknowledged
            eventually(lambda: len(acknowledged), lambda n: n >= 600, interval=0.01,
                       timeout=60, what="600 acknowledged deliveries")
            writer = relay.writer_pid()
            assert relay.kill(signal.SIGKILL) == -signal.SIGKILL
        finally:
            stop.set()
    eventually(lambda: process_gone(writer), timeout=10, interval=0.05,
               what="the spool writer to exit after its relay was killed")

    conn = sqlite3.connect(tmp_path / "spool.db")
    stored = {row[0] for row in conn.execute("SELECT delivery_id FROM deliveries")}
    conn.close()
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged deliveries lost"

    relay.start()
    seen: set[str] = set()
    cursor = "0"
    while cursor:
        status, _, page = http("GET", f"{relay.url}/v1/deliveries?status=pending&limit=1000"
                                      f"&next={cursor}")
        assert status == 200
        seen |= {d["delivery_id"] for d in page["deliveries"]}
        cursor = page["next"]
    assert set(acknowledged) <= seen
    # The sender's ids still dedupe after the restart.
    some_id = next(iter(acknowledged.values()))
    n = int(some_id.removeprefix("evt-"))
    status, _, body = http("POST", relay.url + "/v1/events", event(n))
    assert status == 200 and body["duplicate"] is True


def test_sigterm_exits_zero_and_keeps_data(relay: RelayProcess) -> None:
    """SIGTERM stops the relay with exit code 0 and the spool keeps what was accepted."""
    relay.start()
    status, _, body = http("POST", relay.url + "/v1/events", [event(i) for i in range(50)])
    assert status == 202 and len(body["events"]) == 50
    writer = relay.writer_pid()
    assert relay.kill(signal.SIGTERM) == 0
    assert "stopped" in relay.log()
    # nothing listens on the destinations' port: what is left is said, per destination
    assert re.search(r"stopping with \d+ deliveries pending \(ajo: \d+, braze: \d+, crm: \d+\)",
                     relay.log()), relay.log()
    assert process_gone(writer)   # stopped (and reaped) by the relay before it exited
    relay.start()
    status, _, page = http("GET", relay.url + "/v1/deliveries?limit=1000")
    assert status == 200 and len(page["deliveries"]) == 50 * 3 - 0  # ajo, braze, crm each
    assert http("GET", relay.url + "/readyz")[0] == 200


def test_bad_config_exits_nonzero_with_paths(tmp_path: Path) -> None:
    """`relay serve` with an invalid config exits 1 and names the bad path."""
    path = write_config(tmp_path, delivery={"timeout": "soon"})
    proc = RelayProcess(path, tmp_path / "bad.log")
    with pytest.raises(RuntimeError, match=r"delivery\.timeout"):
        proc.start()
    assert proc.proc is not None and proc.proc.returncode == 1


def test_port_in_use_is_a_clear_error(relay: RelayProcess, tmp_path: Path) -> None:
    """A second relay on a busy port says so and exits, without a traceback."""
    relay.start()
    port = int(relay.url.rsplit(":", 1)[1])
    other = tmp_path / "other"
    other.mkdir()
    proc = RelayProcess(write_config(other, server={"listen": f"127.0.0.1:{port}"}),
                        other / "relay.log")
    with pytest.raises(RuntimeError, match="cannot listen on") as info:
        proc.start()
    assert "Traceback" not in str(info.value)


def test_serve_refuses_a_config_with_no_destinations(tmp_path: Path) -> None:
    """`relay serve` with no destinations exits 1 saying how to mount a config; check-config
    of the same file says the same (tests/test_cli.py)."""
    path = write_config(tmp_path, destinations=[])
    proc = RelayProcess(path, tmp_path / "empty.log")
    with pytest.raises(RuntimeError, match=r"has no destinations.*/etc/relay/config\.yaml"):
        proc.start()
    check = subprocess.run([sys.executable, "-m", "relay", "check-config", str(path)],
                           capture_output=True, text=True)
    assert check.returncode == 1 and "has no destinations" in check.stderr, check.stderr


def test_healthcheck_asks_the_running_relay_and_reads_only_listen(relay: RelayProcess) -> None:
    """`relay healthcheck -c` exits 0 while the relay runs even after its config file was
    broken (only server.listen is read), and 1 once the relay is gone."""
    relay.start()
    port = relay.url.rsplit(":", 1)[1]
    relay.config_path.write_text(f"server: {{listen: '127.0.0.1:{port}'}}\n"
                                 "delivery: {timeout: soon}\ndestinations: [{name: x}]\n")

    def healthcheck() -> int:
        return subprocess.run([sys.executable, "-m", "relay", "healthcheck", "-c",
                               str(relay.config_path)], capture_output=True).returncode

    assert healthcheck() == 0
    # server.listen from the environment, as serve reads it (the Docker HEALTHCHECK runs
    # `relay healthcheck -c`: it said "expected host:port ... (got '${RELAY_LISTEN...}')")
    relay.config_path.write_text("server: {listen: '${HC_LISTEN:-127.0.0.1:1}'}\n")
    env = {**os.environ, "HC_LISTEN": f"127.0.0.1:{port}"}
    assert subprocess.run([sys.executable, "-m", "relay", "healthcheck", "-c",
                           str(relay.config_path)], capture_output=True, env=env).returncode == 0
    relay.kill(signal.SIGTERM)
    assert healthcheck() == 1


def test_a_spool_file_removed_under_the_relay_refuses_events(relay: RelayProcess,
                                                             tmp_path: Path) -> None:
    """The spool file removed while the relay runs: every event answered 202 after it went to
    the unlinked file and was lost at the next start, with /readyz ready and nothing logged
    (a red-team pass, helper-46). Within a second of the removal, ingest answers 503 saying
    why, /readyz is 503 with the same reason, and it is logged (not once per request)."""
    relay.start()
    assert http("POST", relay.url + "/v1/events", event(1))[0] == 202
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    why = "was removed or replaced while the relay ran"
    status, _, body = eventually(lambda: http("POST", relay.url + "/v1/events", event(2)),
                                 lambda answer: answer[0] == 503, interval=0.2,
                                 what="ingest to refuse events", timeout=10)
    assert why in body["error"], body
    status, _, body = http("GET", relay.url + "/readyz")
    assert status == 503 and why in body["error"], body
    assert 1 <= relay.log().count(why) <= 3, relay.log()   # (not a line per request)
    relay.kill(signal.SIGTERM)   # its shutdown no longer says they stay in the file
    assert "for the next relay that opens it" not in relay.log(), relay.log()


def test_a_writer_that_stops_answering_is_said_and_refused(relay: RelayProcess) -> None:
    """A spool writer that stops answering (a frozen disk; here SIGSTOP): every POST waited as
    long as it hung, with /readyz ready and nothing logged (helper-46). After WRITER_SILENT
    new events get a 503 saying why and /readyz is 503; once it answers again, the request
    that waited gets its 202 and events are taken again."""
    relay.start()
    writer = relay.writer_pid()
    os.kill(writer, signal.SIGSTOP)
    waited: list[int] = []
    try:
        first = threading.Thread(target=lambda: waited.append(
            http("POST", relay.url + "/v1/events", event(1), timeout=60)[0]))
        first.start()
        why = "the spool writer has not answered for"
        status, _, body = eventually(lambda: http("GET", relay.url + "/readyz"),
                                     lambda answer: answer[0] == 503, interval=0.5,
                                     what="/readyz to say the writer is stalled", timeout=30)
        assert why in body["error"], body
        status, _, body = http("POST", relay.url + "/v1/events", event(2), timeout=5)
        assert status == 503 and why in body["error"], body
    finally:
        os.kill(writer, signal.SIGCONT)
    first.join(30)
    assert waited == [202]
    eventually(lambda: http("POST", relay.url + "/v1/events", event(3))[0] == 202,
               what="events taken again", timeout=10)
    # (outcomes refused meanwhile pause dispatching until they are recorded: a retry later)
    eventually(lambda: http("GET", relay.url + "/readyz")[0] == 200, what="ready again",
               timeout=60, interval=0.5)
    assert "the spool writer answers again" in relay.log()
