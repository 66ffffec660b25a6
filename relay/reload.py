"""Hot reload: notice config changes (SIGHUP, or files changing on disk), validate, apply.

The config file, and every secret file it names (``*_file``), is polled every ``interval`` by
what ``stat`` says of the path *and* where its symlinks lead, so a Kubernetes ConfigMap or
Secret swap (the ``..data`` symlink moved atomically) is seen as a change. An invalid new
config is logged with its paths and counted; the relay keeps running on the one it has.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from pydantic import BaseModel

from relay.config import Config
from relay.config.load import SECRET_FILE_KEYS, TLS_FILE_KEYS, interpolate, parse_yaml
from relay.destinations import Loaded, load
from relay.errors import ConfigError

log = logging.getLogger("relay.reload")

SETTLE = 0.2        # seconds a changed file must stay the same before it is read
SETTLE_CHECKS = 25  # at most 5 s of waiting for a file that keeps changing

RESTART_KEYS = (("server", "listen"), ("server", "max_body_bytes"), ("server", "workers"),
                # the listener's connection cap and shutdown, and the logging set up at start
                ("server", "max_connections"), ("server", "drain_timeout"),
                ("server", "log_level"), ("server", "log_format"),
                ("spool", "path"), ("spool", "backend"), ("spool", "postgres"),
                # the spool's bounds and windows, given to it (and its writer) when it opens
                ("spool", "max_events"), ("spool", "max_bytes"), ("spool", "dedupe_window"),
                ("spool", "retention"),
                ("delivery", "concurrency"), ("delivery", "per_host_concurrency"),
                ("delivery", "ca_file"),
                # The sending client's resolver, literal check and pooled connections are built
                # with it (relay/transport.py): a reload must say it does not apply yet.
                ("delivery", "allowed_networks"))


# Secret files, and the certificate files of a destination's tls (and delivery.ca_file).
WATCHED_FILE_KEYS = frozenset(SECRET_FILE_KEYS) | frozenset(TLS_FILE_KEYS)


def fingerprint(path: str) -> tuple[object, ...]:
    """What changes when the file (or the target of its symlinks) is replaced or edited."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    except ValueError:   # a NUL in the path: no file has it (loading says so)
        return ("missing", None)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


def secret_files(path: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The *_file paths a config names (so a rotated Secret triggers a reload too), read as
    loading reads them: YAML aliases bounded (a few hundred bytes of nested aliases stood
    for 10^11 values here, and polling walked them for good), ``${VAR}`` references
    expanded."""
    try:
        raw = parse_yaml(Path(path).read_text(encoding="utf-8"), path)
    except (OSError, ConfigError, UnicodeDecodeError):
        return []
    raw = interpolate(raw, "", os.environ if env is None else env, [])
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in WATCHED_FILE_KEYS and isinstance(value, str):
                    found.append(str(Path(path).parent / value))  # absolute paths stay as is
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(raw)
    return sorted(set(found))


def watched(path: str) -> tuple[object, ...]:
    """Fingerprint of the config file and every secret file it names."""
    return (fingerprint(path), *(fingerprint(f) for f in secret_files(path)))


def needs_restart(old: Config, new: Config) -> list[str]:
    return [f"{section}.{key}" for section, key in RESTART_KEYS
            if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)]


MAX_NAMED = 10   # changed keys named in the reload's log line; the rest are counted


def describe_change(old: Config, new: Config) -> str:
    """What a reload changes, for its log line: destinations added and removed, and the keys
    that changed (``delivery.max_retries``, ``destinations[crm].headers``), names only, never
    values; "" when none did. Keys that apply only after a restart are left to that
    warning."""
    before = {d.name: d for d in old.destinations}
    after = {d.name: d for d in new.destinations}
    parts = []
    if added := sorted(after.keys() - before.keys()):
        parts.append("added " + ", ".join(added))
    if removed := sorted(before.keys() - after.keys()):
        parts.append("removed " + ", ".join(removed) + " (their pending deliveries are kept)")
    restart = tuple(f"{section}.{key}" for section, key in RESTART_KEYS)
    keys = [key for key in changed_keys(old, new)
            if not any(key == r or key.startswith(r + ".") for r in restart)]
    for name in sorted(before.keys() & after.keys()):
        keys += changed_keys(before[name], after[name], f"destinations[{name}]")
    if keys:
        more = f" and {len(keys) - MAX_NAMED} more" if len(keys) > MAX_NAMED else ""
        parts.append("changed " + ", ".join(keys[:MAX_NAMED]) + more)
    return "; ".join(parts)


def changed_keys(old: BaseModel, new: BaseModel, path: str = "") -> list[str]:
    """The dotted paths under ``path`` whose values differ between two models (the sections of
    a Config, not its destinations: those go by name). A key whose value changes kind (an
    auth of another type) is named whole."""
    if type(old) is not type(new):
        return [path]
    keys: list[str] = []
    for name, field in type(old).model_fields.items():
        if field.exclude or name == "destinations":
            continue
        was, now = getattr(old, name), getattr(new, name)
        if was == now:
            continue
        key = f"{path}.{field.alias or name}" if path else field.alias or name
        if isinstance(was, BaseModel) and isinstance(now, BaseModel):
            keys += changed_keys(was, now, key)
        else:
            keys.append(key)
    return keys


class ConfigWatcher:
    """Reloads ``path`` on demand or when it changes, handing valid configs (with their
    destinations compiled by ``load``) to ``apply``."""

    def __init__(self, path: str, current: Config, apply: Callable[[Loaded], None],
                 on_result: Callable[[bool], None] = lambda ok: None,
                 interval: float = 1.0, load: Callable[[str], Loaded] = load,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 probe: Callable[[str], tuple[object, ...]] = watched) -> None:
        self.path = path
        self.current = current
        self.started = current   # what restart-only keys still are (reloads do not apply them)
        self._apply = apply
        self._load = load
        self._on_result = on_result
        self.interval = interval
        self._sleep = sleep    # injected so tests step the polling without real waiting
        self._probe = probe
        self._seen = probe(path)
        self._lock = asyncio.Lock()

    async def watch(self) -> None:
        """Poll for changes until cancelled; reload once a change has settled."""
        while True:
            await self._sleep(self.interval)
            now = await asyncio.to_thread(self._probe, self.path)
            if now == self._seen:
                continue
            # An editor that truncates and then writes leaves a moment in which the file is
            # empty (and an empty config is valid): wait until it stops changing.
            for _ in range(SETTLE_CHECKS):
                await self._sleep(SETTLE)
                again = await asyncio.to_thread(self._probe, self.path)
                if again == now:
                    break
                now = again
            self._seen = now
            await self.reload("the file changed")

    def _failed(self, reason: str, why: str) -> bool:
        log.error("config reload (%s) failed; still running on the previous config:\n%s",
                  reason, why, extra={"reload": "failed"})
        self._on_result(False)
        return False

    async def reload(self, reason: str) -> bool:
        async with self._lock:
            try:
                # Reading and validating touches the disk (config, secret files): off the loop.
                loaded = await asyncio.to_thread(self._load, self.path)
            except ConfigError as exc:
                return self._failed(reason, str(exc))
            except Exception as exc:  # a bug must not end reloading, nor go unsaid
                log.exception("config reload (%s): unexpected error", reason)
                return self._failed(reason, f"{type(exc).__name__}: {exc}")
            new = loaded.config
            if not new.destinations and self.current.destinations:
                # as `relay serve` refuses it at start: events would be taken and delivered
                # to nobody (an emptied file, a config map mounted wrong)
                return self._failed(reason, "the new config has no destinations: every event "
                                            "would be accepted and delivered to nobody")
            restart = needs_restart(self.started, new)
            if restart:
                log.warning("config reload: %s %s effect only after a restart",
                            ", ".join(restart), "takes" if len(restart) == 1 else "take")
            summary = describe_change(self.current, new) or \
                ("nothing else changed" if restart else "no key changed")
            self.current = new
            self._apply(loaded)
            log.info("config reloaded (%s): %s", reason, summary, extra={"reload": "ok"})
            self._on_result(True)
            return True
