"""One destination's backlog does not stand in front of another destination's deliveries.

A real relay process and two real receivers: one slow (its backlog drains at its pace), one
fast. The relay's request slots (``delivery.concurrency``) are as many as one host may use, so
the backlog could take every slot; it must still let the live destination's deliveries go as
they come, not after the whole backlog.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import RelayProcess, event, http, write_config
from tests.receiver import Answer, Receiver

pytestmark = pytest.mark.slow

BACKLOG = 1500   # events for the slow destination, posted first
LIVE = 10        # then events for the fast one, one at a time


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_live_destination_is_not_held_behind_another_ones_backlog(
        tmp_path: Path, receivers: Callable[..., Receiver], backend: str,
        request: pytest.FixtureRequest) -> None:
    """1,500 deliveries wait for a receiver that takes 20 ms a request (8 at a time: about
    4 s of work); 10 events for a second, fast receiver posted after them arrive while most of
    the backlog still waits. Before looks shared the batch between destinations and the ready
    deliveries took turns, they arrived only once the backlog had drained (all 1,500 first).
    On both spools (PostgreSQL's looks claim rows; its offers are leased at ingest)."""
    slow, fast = receivers(Answer(delay=0.02)), receivers()
    spool = {} if backend == "sqlite" else {
        "backend": "postgres",
        "postgres": {"dsn": request.getfixturevalue("pg_dsn"), "schema": "relay"}}
    config = write_config(
        tmp_path, **({"spool": spool} if spool else {}),
        delivery={"allowed_ports": [slow.port, fast.port], "concurrency": 8,
                  "per_host_concurrency": 8, "timeout": "5s"},
        destinations=[
            {"name": "backlog", "format": "braze", "url": f"{slow.url}/backlog",
             "channels": ["email"]},
            {"name": "live", "format": "braze", "url": f"{fast.url}/live",
             "channels": ["sms"]}])
    relay = RelayProcess(config, tmp_path / "relay.log").start()
    try:
        for start in range(0, BACKLOG, 100):
            status, _, _ = http("POST", relay.url + "/v1/events",
                                [event(i) for i in range(start, start + 100)])
            assert status == 202
        for i in range(LIVE):
            status, _, _ = http("POST", relay.url + "/v1/events", event(
                BACKLOG + i, channel="sms", recipient={"phone": "+15550100"}))
            assert status == 202
        live = fast.wait_for(LIVE, "/live", timeout=60)
        last = max(r.at for r in live)
        before = sum(r.at <= last for r in slow.received("/backlog"))
        # (the 20 ms each backlog request takes bounds how many can go before: about 400 a
        # second, and the live events were all posted within a second or two of the first)
        assert before < BACKLOG * 2 // 3, \
            f"the live destination waited for {before} of {BACKLOG} backlog deliveries"
        assert len(slow.wait_for(BACKLOG, "/backlog", timeout=60)) == BACKLOG
    finally:
        relay.stop()
