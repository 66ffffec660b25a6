"""Hot reload's watcher, stepped by an injected sleep: no test here waits for real time.

The sleep given to ConfigWatcher runs the test's next scripted step (a file edit, or nothing)
and returns at once; when the script is used up it raises ``Done``, which ends ``watch()``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import load_config, parse_config
from relay.destinations import Loaded
from relay.reload import SETTLE, SETTLE_CHECKS, ConfigWatcher, needs_restart, watched
from tests.helpers import write_config

INTERVAL = 1.0


class Done(Exception):
    """The scripted sleep has no steps left."""


class Steps:
    """An injected sleep: records each duration asked for, runs the next step, returns."""

    def __init__(self, *steps: Callable[[], object] | None) -> None:
        self.steps = list(steps)
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        if not self.steps:
            raise Done
        self.slept.append(seconds)
        step = self.steps.pop(0)
        if step is not None:
            step()


def fingerprints(*values: object) -> Callable[[str], tuple[object, ...]]:
    """A probe answering ``values`` in turn (the first at construction), then the last forever."""
    answers = iter(values)
    last: list[object] = []

    def probe(path: str) -> tuple[object, ...]:
        last[:] = [next(answers, *last)]
        return (last[0],)

    return probe


class Run:
    """A watcher on a real config file, with what it applied and reported."""

    def __init__(self, tmp_path: Path, sleep: Steps, **watcher: Any) -> None:
        self.path = write_config(tmp_path, **watcher.pop("sections", {}))
        self.config = load_config(self.path)
        self.applied: list[Loaded] = []
        self.results: list[bool] = []
        self.watcher = ConfigWatcher(str(self.path), self.config, self.applied.append,
                                     on_result=self.results.append, interval=INTERVAL,
                                     sleep=sleep, **watcher)

    async def watch(self) -> None:
        with pytest.raises(Done):
            await self.watcher.watch()


async def test_unchanged_polls_do_nothing(tmp_path: Path) -> None:
    """Polls that find the same fingerprint neither reload nor wait to settle."""
    sleep = Steps(None, None, None)
    run = Run(tmp_path, sleep, probe=fingerprints("a"))
    await run.watch()
    assert sleep.slept == [INTERVAL] * 3
    assert run.applied == [] and run.results == []


async def test_a_change_that_settles_reloads_once(tmp_path: Path) -> None:
    """A change still the same one SETTLE later is reloaded once, and not again on the next
    poll."""
    sleep = Steps(None, None, None)
    run = Run(tmp_path, sleep, probe=fingerprints("a", "b", "b"))
    await run.watch()
    assert sleep.slept == [INTERVAL, SETTLE, INTERVAL]
    assert len(run.applied) == 1 and run.results == [True]


async def test_a_change_is_waited_on_until_it_stops(tmp_path: Path) -> None:
    """A file still changing at the first settle check is checked again until it holds still."""
    sleep = Steps(None, None, None, None)
    run = Run(tmp_path, sleep, probe=fingerprints("a", "b", "c", "d", "d"))
    await run.watch()
    assert sleep.slept == [INTERVAL, SETTLE, SETTLE, SETTLE]
    assert len(run.applied) == 1


async def test_a_file_that_keeps_changing_is_waited_on_at_most_settle_checks(
        tmp_path: Path) -> None:
    """A file that never holds still is waited on SETTLE_CHECKS x SETTLE, then reloaded once."""
    counter = itertools.count()
    sleep = Steps(*[None] * (1 + SETTLE_CHECKS))
    run = Run(tmp_path, sleep, probe=lambda path: (next(counter),))
    await run.watch()
    assert sleep.slept == [INTERVAL] + [SETTLE] * SETTLE_CHECKS
    assert len(run.applied) == 1


async def test_a_half_written_config_is_not_applied(tmp_path: Path) -> None:
    """An editor's truncate-then-write is read once it settles: the empty file in between
    (itself a valid config) is never applied."""
    path = write_config(tmp_path)
    full = path.read_text()
    sleep = Steps(lambda: path.write_text(""),                    # truncated at a poll ...
                  lambda: path.write_text(full + "\n# edited\n"),  # ... written while settling
                  None, None)
    run = Run(tmp_path, sleep)
    await run.watch()
    assert len(run.applied) == 1 and len(run.applied[0].config.destinations) == 3


async def test_rotated_secret_file_triggers_reload(tmp_path: Path) -> None:
    """Changing a secret file the config names reloads the config with the new secret."""
    secret = tmp_path / "token"
    secret.write_text("first-token-value")
    sleep = Steps(None, lambda: secret.write_text("second-token-value"), None)
    run = Run(tmp_path, sleep, sections={"destinations": [{
        "name": "b", "format": "braze", "url": "http://127.0.0.1:9/b",
        "auth": {"type": "bearer", "token_file": str(secret)}}]})
    await run.watch()
    assert sleep.slept == [INTERVAL, INTERVAL, SETTLE]     # the first poll saw no change
    (applied,) = run.applied
    assert applied.config.destinations[0].auth.token.get_secret_value() == "second-token-value"


async def test_an_invalid_edit_keeps_the_running_config(tmp_path: Path) -> None:
    """An edit that does not validate is reported as a failure and nothing is applied."""
    path = write_config(tmp_path)
    sleep = Steps(lambda: path.write_text(path.read_text() + "\nbogus_section: {}\n"), None)
    run = Run(tmp_path, sleep)
    await run.watch()
    assert run.applied == [] and run.results == [False]
    assert run.watcher.current is run.config


def test_settings_the_sending_client_is_built_with_are_reported_as_needing_a_restart() -> None:
    """The egress allow-list is built into the sending client, so a reload that changes it
    says so instead of appearing to apply; a destination change does not."""
    def config(networks: list[str], url: str = "https://crm.example.com/hook") -> Any:
        return parse_config(json.dumps({
            "delivery": {"allowed_networks": networks},
            "destinations": [{"name": "b", "format": "braze", "url": url}]}), env={})

    old = config([])
    assert needs_restart(old, config(["10.0.0.0/8"])) == ["delivery.allowed_networks"]
    assert needs_restart(old, config([], "https://crm.example.com/other")) == []


async def test_a_config_with_no_destinations_is_not_applied(tmp_path: Path) -> None:
    """An emptied config file (valid to the config schema) removed every destination on
    reload, and the relay went on taking events it delivered to nobody; `relay serve` refuses
    such a file at start, and so does a reload now."""
    run = Run(tmp_path, Steps())
    run.path.write_text("")
    assert await run.watcher.reload("SIGHUP") is False
    assert run.applied == [] and run.results == [False]
    assert run.watcher.current is run.config


async def test_any_failure_to_load_is_a_failed_reload_not_a_crash(tmp_path: Path) -> None:
    """An exception other than a config error while loading (a bug) is logged and counted as
    a failed reload, the running config kept: from the file watcher it crashed the watcher's
    task, and from SIGHUP nothing was logged at all."""
    def broken(path: str) -> Loaded:
        raise ValueError("a bug")

    run = Run(tmp_path, Steps(), load=broken)
    assert await run.watcher.reload("SIGHUP") is False
    assert run.applied == [] and run.results == [False]


async def test_restart_only_keys_are_compared_with_what_runs(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    """A restart-only key changed by one reload still does not apply at the next: each reload
    says so while the file differs from what the relay started with, and says nothing once
    the file is back (it compared with the last config applied, so it said it once, then
    nothing, and warned when the file went back to what runs)."""
    run = Run(tmp_path, Steps())
    original = run.path.read_text()
    moved = original.replace("127.0.0.1:0", "127.0.0.1:1")
    assert moved != original
    said = []
    for text in (moved, moved.replace("braze", "braze", 1) + "\n", original):
        run.path.write_text(text)
        caplog.clear()
        assert await run.watcher.reload("SIGHUP") is True
        said.append("server.listen" in caplog.text)
    assert said == [True, True, False]


def reloaded_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "relay.reload"]


async def test_a_reload_names_the_keys_it_changed_never_their_values(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reload's log line names each changed key as a dotted path (a destination by its
    name), not "no destination changed"; a secret's key is named, its value never shown."""
    run = Run(tmp_path, Steps())
    text = yaml.safe_load(run.path.read_text())
    text["delivery"] |= {"max_retries": 7, "rate_limit": {"per_second": 5}}
    text["destinations"][2] |= {"headers": {"X-Env": "prod"},
                                "auth": {"type": "bearer", "token": "s3cret-token"}}
    run.path.write_text(yaml.safe_dump(text))
    caplog.set_level("INFO", "relay.reload")
    assert await run.watcher.reload("the file changed") is True
    assert reloaded_lines(caplog) == [
        "config reloaded (the file changed): changed delivery.max_retries, delivery.rate_limit, "
        "destinations[crm].auth, destinations[crm].headers"]
    text["destinations"][2]["auth"]["token"] = "an0ther-token"
    text["destinations"].append({"name": "new", "format": "braze", "url": "https://b.example/"})
    run.path.write_text(yaml.safe_dump(text))
    caplog.clear()
    assert await run.watcher.reload("SIGHUP") is True
    assert reloaded_lines(caplog) == [
        "config reloaded (SIGHUP): added new; changed destinations[crm].auth.token"]
    assert "s3cret" not in caplog.text and "an0ther" not in caplog.text


async def test_a_reload_counts_the_keys_past_ten(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Past ten changed keys the line says how many more, not all of them."""
    run = Run(tmp_path, Steps())
    text = yaml.safe_load(run.path.read_text())
    text["destinations"][1]["headers"] = {"X-A": "1"}
    text["delivery"] |= {"max_retries": 7, "retry_window": "1h", "unreachable_window": "1h",
                         "backoff_initial": "1s", "backoff_max": "1m", "timeout": "5s"}
    text["health"] = {"window": "2m", "min_failures": 3, "failure_rate": 0.5,
                      "consecutive_failures": 4, "suspend_for": "2m", "suspend_max": "1h"}
    run.path.write_text(yaml.safe_dump(text))
    caplog.set_level("INFO", "relay.reload")
    assert await run.watcher.reload("SIGHUP") is True
    (line,) = reloaded_lines(caplog)
    assert line.endswith(", health.consecutive_failures and 3 more"), line
    assert line.count(", ") == 9


@pytest.mark.parametrize(("keys", "said"), [
    ({"concurrency": 8}, "config reload: delivery.concurrency takes effect only after a restart"),
    ({"concurrency": 8, "per_host_concurrency": 4},
     "config reload: delivery.concurrency, delivery.per_host_concurrency take effect only after "
     "a restart")])
async def test_the_restart_warning_agrees_with_its_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, keys: dict[str, int], said: str) -> None:
    """One key "takes effect", several "take effect", only after a restart; the reload's own
    line then says nothing else changed."""
    run = Run(tmp_path, Steps())
    text = yaml.safe_load(run.path.read_text())
    text["delivery"] |= keys
    run.path.write_text(yaml.safe_dump(text))
    caplog.set_level("INFO", "relay.reload")
    assert await run.watcher.reload("SIGHUP") is True
    assert reloaded_lines(caplog) == [said, "config reloaded (SIGHUP): nothing else changed"]


def test_the_spool_backend_and_its_database_settings_need_a_restart() -> None:
    """A reload that changed spool.backend or spool.postgres (a rotated DSN password, another
    schema) logged "config reloaded" while the old database stayed in use; it says a restart
    is needed."""
    def config(spool: dict[str, Any]) -> Any:
        return parse_config(json.dumps({
            "spool": spool, "destinations": [{"name": "b", "format": "braze",
                                              "url": "https://crm.example.com/hook"}]}), env={})

    old = config({"backend": "postgres", "postgres": {"dsn": "postgresql://u:one@db/relay"}})
    rotated = config({"backend": "postgres", "postgres": {"dsn": "postgresql://u:two@db/relay"}})
    assert needs_restart(old, rotated) == ["spool.postgres"]
    assert "spool.backend" in needs_restart(old, config({"backend": "sqlite"}))


@pytest.mark.parametrize(("section", "key", "value"), [
    ("server", "max_connections", 77), ("server", "drain_timeout", "1s"),
    ("server", "log_level", "debug"), ("server", "log_format", "text"),
    ("spool", "max_events", 1), ("spool", "max_bytes", 10_000_000),
    ("spool", "dedupe_window", "1h"), ("spool", "retention", "2d")])
def test_keys_read_once_at_start_are_reported_as_needing_a_restart(
        section: str, key: str, value: Any) -> None:
    """The spool's bounds and windows, the listener's cap and drain and the logging are set
    up at start: a reload that changed them logged "config reloaded" and went on with the old
    values (spool.max_events 1 still took every event)."""
    base = {"destinations": [{"name": "b", "format": "braze", "url": "https://x.example.com/b"}]}
    old = parse_config(json.dumps(base), env={})
    new = parse_config(json.dumps({**base, section: {key: value}}), env={})
    assert needs_restart(old, new) == [f"{section}.{key}"]


def test_secret_files_are_found_as_loading_finds_them(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A *_file named through ${VAR} is watched at the path it expands to (the watcher read
    the raw YAML and watched '<dir>/${SECRET_DIR}/tok'), and a file whose YAML aliases
    expand past the loader's bound is not walked (a 532-byte file stood for 10^11 values:
    the watcher spun on it for good, and the relay no longer stopped on SIGTERM)."""
    secret = tmp_path / "secrets" / "tok"
    secret.parent.mkdir()
    secret.write_text("a-token-value")
    path = write_config(tmp_path, destinations=[{
        "name": "b", "format": "braze", "url": "https://x.example.com/b",
        "auth": {"type": "bearer", "token_file": "${SECRET_DIR}/tok"}}])
    monkeypatch.setenv("SECRET_DIR", str(secret.parent))
    seen = watched(str(path))
    assert len(seen) == 2 and seen[1][0] == str(secret)
    secret.write_text("another-token-value, longer")
    assert watched(str(path)) != seen
    bomb = "x0: &a0 [" + ",".join(["x"] * 10) + "]\n" + "".join(
        f"x{n}: &a{n} [" + ",".join([f"*a{n - 1}"] * 10) + "]\n" for n in range(1, 11))
    path.write_text(bomb + "token_file: never-read\n")
    assert watched(str(path)) == (watched(str(path))[0],)
