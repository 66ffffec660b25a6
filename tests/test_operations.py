"""Operations: metrics move as events flow, hot reload under load, graceful drain, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import load_config
from relay.logs import JsonFormatter, MaskSecrets, config_secrets
from relay.reload import fingerprint
from tests.helpers import RelayProcess, event, eventually, http, write_config
from tests.receiver import Answer, Receiver

pytestmark = pytest.mark.slow


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sname, _, slabels = sample.partition("{")
        got = ",".join(sorted(slabels.rstrip("}").split(","))) if slabels else ""
        if sname == name and got == want:
            return float(value)
    return 0.0


def dest(name: str, receiver: Receiver) -> dict[str, Any]:
    return {"name": name, "format": "braze", "url": f"{receiver.url}/{name}"}


def relay_config(tmp_path: Path, receiver: Receiver, *dests: str, **extra: Any) -> Path:
    return write_config(tmp_path, delivery={"allowed_ports": [receiver.port],
                                            "backoff_initial": "50ms", "backoff_max": "200ms"},
                        destinations=[dest(n, receiver) for n in dests], **extra)


def test_metrics_change_as_events_flow(tmp_path: Path, receiver: Receiver) -> None:
    """Scrape, post, scrape again: counters, the latency histogram and spool gauges move."""
    relay = RelayProcess(relay_config(tmp_path, receiver, "a"), tmp_path / "relay.log").start()
    try:
        status, headers, before = http("GET", relay.url + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert metric(before, "relay_events_accepted_total") == 0
        http("POST", relay.url + "/v1/events", [event(i) for i in range(5)])
        http("POST", relay.url + "/v1/events", event(0))                  # a duplicate
        http("POST", relay.url + "/v1/events", {"channel": "fax"})        # rejected
        receiver.wait_for(5)
        # The spool gauges are read at the start of a scrape and the counters at its end,
        # so one scrape can straddle the commit of the last outcomes: wait for both.
        after = eventually(
            lambda: http("GET", relay.url + "/metrics")[2],
            lambda text: metric(text, "relay_deliveries_total", destination="a",
                                outcome="delivered") == 5
            and metric(text, "relay_spool_deliveries", state="delivered") == 5,
            what="5 delivered in both the counter and the spool gauge", timeout=10,
            interval=0.05)
        assert metric(after, "relay_events_accepted_total") == 5
        assert metric(after, "relay_events_duplicate_total") == 1
        assert metric(after, "relay_events_rejected_total", reason="invalid") == 1
        assert metric(after, "relay_attempt_duration_seconds_count", destination="a") == 5
        assert metric(after, "relay_spool_deliveries", state="delivered") == 5
        host = f"http://127.0.0.1:{receiver.port}"
        assert metric(after, "relay_host_state", host=host, state="healthy") == 1
        assert "msg-" not in after and "user0@" not in after  # no event data in labels
    finally:
        relay.stop()


def test_config_edit_adds_a_destination_under_load(tmp_path: Path, receiver: Receiver) -> None:
    """Editing the file adds a destination that then gets new events; no 5xx, nothing lost;
    an invalid edit leaves the relay running on the previous config."""
    path = relay_config(tmp_path, receiver, "a")
    relay = RelayProcess(path, tmp_path / "relay.log").start()
    statuses: list[int] = []
    accepted: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        i = 0
        while not stop.is_set():
            status, _, _ = http("POST", relay.url + "/v1/events", event(10_000 + i))
            statuses.append(status)
            if status == 202:
                accepted.append(f"evt-{10_000 + i}")
            i += 1
            time.sleep(0.005)

    worker = threading.Thread(target=sender)
    worker.start()
    try:
        eventually(lambda: len(accepted) >= 10, what="the sender to be under way", timeout=10)
        config = yaml.safe_load(path.read_text())
        config["destinations"].append(dest("b", receiver))
        tmp = path.with_suffix(".new")
        tmp.write_text(yaml.safe_dump(config))
        os.replace(tmp, path)                                  # as editors and ConfigMaps do
        eventually(lambda: "config reloaded" in relay.log(), what="the reload to be logged",
                   timeout=10, interval=0.05)
        assert "added b" in relay.log()
        status, _, body = http("POST", relay.url + "/v1/events", event(1))
        assert status == 202
        assert {d["destination"] for d in body["events"][0]["deliveries"]} == {"a", "b"}

        path.write_text(path.read_text() + "\nbogus_section: {}\n")   # an invalid edit
        eventually(lambda: "reload (the file changed) failed" in relay.log(),
                   what="the failed reload to be logged", timeout=10, interval=0.05)
        assert "bogus_section: unknown key" in relay.log()
        os.kill(relay.proc.pid, signal.SIGHUP)                         # SIGHUP also reloads
        eventually(lambda: relay.log().count("reload (SIGHUP) failed"),
                   what="the SIGHUP reload to be logged", timeout=10, interval=0.05)
        stop.set()
        worker.join()
        assert http("GET", relay.url + "/healthz")[0] == 200
        assert set(statuses) == {202}, f"non-202 answers while reloading: {set(statuses)}"
        metrics = http("GET", relay.url + "/metrics")[2]
        assert metric(metrics, "relay_config_reloads_total", result="success") == 1
        assert metric(metrics, "relay_config_reloads_total", result="failure") == 2
        received = receiver.wait_for(len(accepted), "/a")
        got = {json.loads(r.body)["dispatch_id"] for r in received}
        assert {f"msg-{e.removeprefix('evt-')}" for e in accepted} <= got   # nothing lost
        receiver.wait_for(1, "/b")
    finally:
        stop.set()
        relay.stop()


def test_configmap_symlink_swap_is_noticed(tmp_path: Path) -> None:
    """Swapping the ..data symlink (how Kubernetes updates a ConfigMap) changes the fingerprint."""
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "relay.yaml").write_text(f"# {version}\n")
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "relay.yaml").symlink_to("..data/relay.yaml")
    before = fingerprint(str(tmp_path / "relay.yaml"))
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert fingerprint(str(tmp_path / "relay.yaml")) != before


def test_sigterm_during_delivery_exits_zero_and_loses_nothing(tmp_path: Path,
                                                              receiver: Receiver) -> None:
    """SIGTERM while attempts are in flight: exit 0; after restart every event is delivered."""
    receiver.set_default(Answer(200, delay=0.4))
    path = relay_config(tmp_path, receiver, "a", server={"listen": "127.0.0.1:0",
                                                         "drain_timeout": "100ms"})
    relay = RelayProcess(path, tmp_path / "relay.log").start()
    status, _, _ = http("POST", relay.url + "/v1/events", [event(i) for i in range(40)])
    assert status == 202
    receiver.wait_for(1)
    assert relay.kill(signal.SIGTERM) == 0
    assert "stopped" in relay.log()
    receiver.set_default(Answer(200))
    relay.start()
    try:
        ok = eventually(lambda: {json.loads(r.body)["dispatch_id"] for r in receiver.received()
                                 if r.status == 200},
                        lambda ok: len(ok) == 40, what="40 events answered 200", timeout=15,
                        interval=0.05)
        assert ok == {f"msg-{i}" for i in range(40)}
    finally:
        relay.stop()


def test_logs_are_json_lines_with_fields_and_no_secrets(tmp_path: Path,
                                                        receiver: Receiver) -> None:
    """Off a terminal each log line is a JSON object; delivery lines carry their fields;
    configured secrets never appear."""
    receiver.set_default(Answer(503))
    path = write_config(tmp_path, delivery={"allowed_ports": [receiver.port],
                                            "backoff_initial": "50ms", "max_retries": 1},
                        server={"listen": "127.0.0.1:0", "token": "top-secret-token"},
                        destinations=[{**dest("a", receiver),
                                       "auth": {"type": "bearer", "token": "dest-secret-123"}}])
    relay = RelayProcess(path, tmp_path / "relay.log").start()
    try:
        http("POST", relay.url + "/v1/events", event(1),
             headers={"Authorization": "Bearer top-secret-token"})
        receiver.wait_for(2)
        eventually(lambda: '"outcome": "failed"' in relay.log(),
                   what="the failed delivery to be logged", timeout=10, interval=0.05)
    finally:
        relay.stop()
    lines = [json.loads(line) for line in relay.log().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    failed = [x for x in lines if x.get("outcome") == "failed"]
    assert failed and failed[0]["destination"] == "a" and failed[0]["delivery_id"].startswith("dlv_")
    assert "top-secret-token" not in relay.log() and "dest-secret-123" not in relay.log()


def test_mask_secrets_filter(tmp_path: Path) -> None:
    """Secret values are replaced in messages and their arguments, whatever logged them."""
    config = load_config(write_config(tmp_path, server={"token": "abcdef123456"}), env={})
    mask = MaskSecrets(config_secrets(config))
    record = logging.makeLogRecord({"msg": "token %s leaked", "args": ("abcdef123456",)})
    mask.filter(record)
    assert record.getMessage() == "token **** leaked"
    line = json.loads(JsonFormatter().format(logging.makeLogRecord(
        {"msg": "x", "delivery_id": "dlv_1", "levelname": "INFO"})))
    assert line["delivery_id"] == "dlv_1" and line["message"] == "x"
    assert re.match(r"\d{4}-\d\d-\d\dT", line["time"])
