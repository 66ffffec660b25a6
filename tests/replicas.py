"""Several ``relay serve`` processes on one PostgreSQL database (tests and bench/replicas.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tests.helpers import RelayProcess, http, write_config
from tests.receiver import Receiver


def replica_config(directory: Path, dsn: str, receiver: Receiver, *, spool: dict[str, Any] | None
                   = None, **sections: Any) -> Path:
    """One replica's config: a braze destination ``a`` at the receiver, the spool on ``dsn``."""
    directory.mkdir(parents=True, exist_ok=True)
    delivery = {"allowed_ports": [receiver.port], "allowed_networks": ["127.0.0.0/8"],
                "backoff_initial": "50ms", "backoff_max": "500ms", "timeout": "2s",
                **sections.pop("delivery", {})}
    return write_config(
        directory, delivery=delivery,
        spool={"backend": "postgres", "postgres": {"dsn": dsn, "schema": "relay",
                                                   **(spool or {}).pop("postgres", {})},
               **(spool or {})},
        destinations=[{"name": "a", "format": "braze", "url": f"{receiver.url}/a"}],
        **sections)


def replicas(tmp_path: Path, dsn: str, receiver: Receiver, n: int,
             **sections: Any) -> list[RelayProcess]:
    """``n`` replicas (not started), ids r0, r1, ..., each with its own config and log."""
    made = []
    for i in range(n):
        directory = tmp_path / f"r{i}"
        config = replica_config(directory, dsn, receiver, **json.loads(json.dumps(sections)))
        made.append(RelayProcess(config, directory / "relay.log", env={"RELAY_REPLICA_ID": f"r{i}"}))
    return made


def delivered(receiver: Receiver) -> Counter[str]:
    """message id -> 2xx deliveries the receiver answered."""
    found: Counter[str] = Counter()
    for r in receiver.received("/a"):
        if 200 <= r.status < 300:
            found[json.loads(r.body)["dispatch_id"]] += 1
    return found


def webhook_ids(receiver: Receiver) -> Counter[str]:
    """delivery id -> requests the receiver got for it (any answer)."""
    return Counter(r.headers["webhook-id"] for r in receiver.received("/a"))


def hosts(relay: RelayProcess) -> list[dict[str, Any]]:
    status, _, body = http("GET", relay.url + "/v1/hosts")
    assert status == 200, body
    return list(body["hosts"])
