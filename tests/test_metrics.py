"""Metrics without noise, scraped from a real relay process: no `_created` samples, outcome
series at 0 for every destination (at start and after a reload), JWT series only for JWT
destinations."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import OUTCOMES
from tests.helpers import RelayProcess, destinations, event, eventually, http, write_config

SIGNED = {"name": "signed", "format": "template", "url": "http://127.0.0.1:9/signed",
          "auth": {"type": "jwt", "algorithm": "HS256", "key": "k" * 32},
          "template": {"method": "POST", "body": {"type": "json", "fields": {"a": "b"}}}}


def scrape(relay: RelayProcess) -> tuple[str, list[Any]]:
    status, _, text = http("GET", relay.url + "/metrics")
    assert status == 200
    return text, [s for family in text_string_to_metric_families(text) for s in family.samples]


def outcome_series(samples: list[Any]) -> dict[tuple[str, str], float]:
    return {(s.labels["destination"], s.labels["outcome"]): s.value for s in samples
            if s.name == "relay_deliveries_total"}


def test_metrics_have_no_noise(tmp_path: Path) -> None:
    """No `_created` series; delivered/retried/failed/skipped start at 0 for each destination,
    also for one added by a reload; JWT mint counts exist for the JWT destination only."""
    path = write_config(tmp_path, destinations=[*destinations(), SIGNED])
    relay = RelayProcess(path, tmp_path / "relay.log")
    relay.start()
    try:
        text, samples = scrape(relay)
        assert "_created" not in text
        names = ["ajo", "braze", "crm", "signed"]
        series = outcome_series(samples)
        assert {(n, o): 0.0 for n in names for o in OUTCOMES}.items() <= series.items()

        assert http("POST", relay.url + "/v1/events", event(1))[0] == 202
        minted = eventually(
            lambda: {s.labels["destination"] for s in scrape(relay)[1]
                     if s.name == "relay_jwt_tokens_minted_total"},
            what="a JWT minted for the signed destination")
        assert minted == {"signed"}

        config = yaml.safe_load(path.read_text())
        config["destinations"].append({**destinations()[1], "name": "later"})
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGHUP)
        later = eventually(lambda: outcome_series(scrape(relay)[1]),
                           lambda found: ("later", "skipped") in found,
                           what="the reloaded destination's series")
        assert {("later", o): 0.0 for o in OUTCOMES}.items() <= later.items()
        assert "_created" not in scrape(relay)[0]
    finally:
        relay.stop()
