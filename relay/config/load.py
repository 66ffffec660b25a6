"""Loading: YAML in, a frozen ``Config`` out, or a ConfigError naming every bad path.

Loading runs four passes, each collecting every problem before failing:
  1. YAML parse (syntax errors carry the line; duplicate keys are errors, not "last one wins"),
  2. ``${NAME}`` / ``${NAME:-default}`` interpolation in every string value,
  3. ``*_file`` secrets read from disk (``token_file``, ``password_file``, ``key_file``, ``secret_file``),
  4. schema validation (unknown keys, wrong types, durations to seconds), then the
     cross-field checks of ``relay.config.checks``.
Defaults are written once, beside their field. Secrets are ``SecretStr`` and never appear in repr.
This module does no I/O after load and knows nothing of HTTP, SQLite or payload formats: what
needs compiling (templates, signing keys) is checked by ``relay.destinations``, which builds on
the ``Config`` made here.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pydantic
import yaml

from relay.config.checks import check_config, holds
from relay.config.fields import MAX_DESTINATIONS
from relay.config.schema import (
    AjoConfig,
    BasicAuth,
    BearerAuth,
    Config,
    DeliveryConfig,
    Destination,
    HealthConfig,
    HmacAuth,
    JsonBody,
    JwtAuth,
    OAuth2Auth,
    PostgresConfig,
    RateLimit,
    RawBody,
    SandboxConfig,
    ServerConfig,
    SpoolConfig,
    TemplateConfig,
    TemplateVariant,
    TlsConfig,
    sendable_token,
    split_listen,
)
from relay.errors import ConfigError
from relay.validation import join as _join
from relay.validation import problems_from

SECRET_FILE_KEYS = ("token_file", "password_file", "key_file", "secret_file", "dsn_file",
                    "client_secret_file")
# Under a destination's ``tls`` these name files loaded as they are (certificates, keys), not
# secrets read into the config: relative paths are made absolute against the config's folder.
TLS_FILE_KEYS = ("cert_file", "key_file", "ca_file")


class Checked(NamedTuple):
    """A config file checked as far as it goes: its valid parts and every problem found.

    A section's key that fails validation is replaced by its default, and a destination entry
    that fails is left out, so the rest still gets its cross-field checks (and, in
    ``relay.destinations.load``, compiled): every problem of a file is reported in one round.
    ``positions`` is each kept destination's index in the file, for problem paths; ``broken``
    the paths whose values are not the file's (a key that failed validation, a value that
    could not be interpolated or read from its file), which no later check may judge.
    """

    config: Config
    problems: list[tuple[str, str]]
    positions: tuple[int, ...]
    broken: frozenset[str] = frozenset()   # what ``check_config`` calls ``skip``


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; raise ConfigError listing every problem."""
    checked = check_file(path, env)
    if checked.problems:
        raise ConfigError(checked.problems, str(path))
    return checked.config


def check_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Checked:
    """``load_config`` without raising on validation problems (it still raises ConfigError
    when the file cannot be read or is not YAML: then there is nothing to check further)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read config file: {exc}")], source) from exc
    raw = parse_yaml(text, source)
    return check_raw(raw, source=source, env=env, base_dir=Path(path).parent, file=True)


def parse_config(
    text: str,
    *,
    source: str = "config",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate config given as YAML text (see ``load_config``)."""
    return validate_config(parse_yaml(text, source), source=source, env=env, base_dir=base_dir)


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError([("", f"YAML syntax error at {where}: {exc.problem}")], source) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([("", f"YAML error: {exc}")], source) from exc
    except RecursionError:   # (PyYAML builds nested collections recursively)
        raise ConfigError([("", "the YAML is nested too deeply to read (a few hundred levels); "
                                "no config needs more than a handful")], source) from None
    except (ValueError, OverflowError) as exc:
        # PyYAML's constructors raise these bare: a date such as 2024-13-45, an integer of
        # over 4,300 digits (a traceback in check-config, and a reload watcher restarted)
        raise ConfigError([("", f"a value YAML cannot read: {exc} (quote it to mean text)")],
                          source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([("", f"the config must be a mapping of sections, got {_kind(raw)}")],
                          source)
    if _expands_past(raw, MAX_VALUES):
        raise ConfigError([("", f"the config expands to more than {MAX_VALUES:,} values: YAML "
                                "aliases nested in aliases (a few hundred bytes can stand for "
                                "millions of values); write them out or share less")], source)
    return raw


MAX_VALUES = 1_000_000  # in the config once aliases are expanded (10,000 destinations: ~200,000)


def _expands_past(node: Any, limit: int) -> bool:
    """More than ``limit`` values in ``node`` counting each use of an alias: what every later
    pass (interpolation, secret files, validation) walks. Stops counting at the limit."""
    todo, seen = [node], 0
    while todo:
        seen += 1
        if seen > limit:
            return True
        one = todo.pop()
        if isinstance(one, dict):
            todo += one.values()
        elif isinstance(one, list):
            todo += one
    return False


def validate_config(
    raw: dict[str, Any],
    *,
    source: str = "config",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate an already-parsed config mapping (see ``load_config``)."""
    checked = check_raw(raw, source=source, env=env, base_dir=base_dir)
    if checked.problems:
        raise ConfigError(checked.problems, source)
    return checked.config


def check_raw(
    raw: dict[str, Any],
    *,
    source: str = "config",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    file: bool = False,
) -> Checked:
    """Every problem of a parsed config, structural and cross-field, with its valid parts.

    With ``file`` (the mapping came from a file in ``base_dir``) a relative ``spool.path`` is
    resolved against that folder, as ``*_file`` secrets are: the spool does not move with the
    directory the relay happens to be started from.
    """
    env = os.environ if env is None else env
    problems: list[tuple[str, str]] = []
    unset: list[tuple[str, str]] = []
    data = interpolate(raw, "", env, problems, unset)
    data = _read_secret_files(data, "", base_dir or Path.cwd(), problems)
    if file and base_dir is not None:
        data = _resolve_spool_path(data, base_dir)
    # (a secret file that could not be read, or is empty, stands in as "": its key is not
    # reported again as empty or missing)
    flagged = frozenset({path for path, _ in problems} | {
        path.removesuffix("_file") for path, _ in problems if path.endswith("_file")})
    found: list[tuple[str, str]] = []
    try:
        config = Config.model_validate({**data, "source": source})
    except pydantic.ValidationError as exc:
        found = [_as_written(raw, p) for p in problems_from(exc, data, known=KEY_HOMES)]
        config, broken, positions = _valid_parts(data, source)
    else:
        broken, positions = frozenset(), tuple(range(len(config.destinations)))
    cross = check_config(config, positions=positions, skip=broken | flagged)
    found += cross
    # An unset variable's advice fits its key: whether the value it leaves (its reference
    # read as "") passes the checks says whether ${NAME:-} would do: those just made, and the
    # rules they skipped for its key (an empty server.token leaves an open listener
    # unprotected). Not known when its section or destination failed: not every check ran.
    refused = {path for path, _ in found}
    for path, name in unset:
        empty_ok = False if path in refused else \
            None if not holds(broken, path) or _left_out(path, positions) else True
        if empty_ok and set(check_config(config, positions=positions,
                                         skip=broken | (flagged - {path}))) - set(cross):
            empty_ok = False
        problems[problems.index((path, unset_variable(path, name)))] = \
            (path, unset_variable(path, name, empty_ok))
    problems += [p for p in found if p[0] not in flagged]
    return Checked(config, problems, positions, broken | flagged)


def _left_out(path: str, positions: tuple[int, ...]) -> bool:
    """``path`` is in a destination entry that failed validation (so was not checked)."""
    entry = re.match(r"destinations\[(\d+)\]", path)
    return entry is not None and int(entry.group(1)) not in positions


def _as_written(raw: Any, problem: tuple[str, str]) -> tuple[str, str]:
    """A problem with a key the file did not write, ``X``, that came from its ``X_file``
    (secret_file under bearer auth was "auth.secret: unknown key; secret belongs under a
    destination's auth"): said of ``X_file``."""
    path, message = problem
    parent, _, key = path.rpartition(".")
    node: Any = raw
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", parent):
        if part.startswith("["):
            node = node[int(part[1:-1])] if isinstance(node, list) and \
                int(part[1:-1]) < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or key in node or f"{key}_file" not in node:
        return problem
    if message.startswith("unknown key"):
        return f"{path}_file", f"unknown key: {key}_file is not a key of this section"
    return f"{path}_file", f"(read from the file) {message}"


class Access(NamedTuple):
    """How to reach a running relay's API: what ``relay replay`` needs of a config."""

    base_url: str
    token: str | None
    # where the token comes from, for replay to say when the relay refuses it: the key
    # ("server.token", "server.token_file" or "" for none) and the environment variables its
    # ${...} reads (their names only: a fallback value may be a token)
    token_key: str = ""
    token_vars: tuple[str, ...] = ()


def read_access(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Access:
    """``server.listen`` and the token (``token`` or ``token_file``) of a config file, read and
    interpolated alone: the rest of the file (destinations, their secrets) is not looked at."""
    source = str(path)
    try:
        raw = parse_yaml(Path(path).read_text(encoding="utf-8"), source)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read config file: {exc}")], source) from exc
    server = raw.get("server") or {}
    if not isinstance(server, dict):
        raise ConfigError([("server", "expected a mapping")], source)
    wanted = {k: server[k] for k in ("listen", "token", "token_file") if k in server}
    problems: list[tuple[str, str]] = []
    picked = interpolate(wanted, "server", os.environ if env is None else env, problems)
    picked = _read_secret_files(picked, "server", Path(path).parent, problems)
    listen = picked.get("listen", ServerConfig.model_fields["listen"].default)
    try:
        host, port = split_listen(listen) if isinstance(listen, str) else split_listen("")
    except ValueError as exc:
        problems.append(("server.listen", str(exc)))
    token = picked.get("token") or None
    if token is not None and not isinstance(token, str):
        problems.append(("server.token", "expected a string"))
    elif token is not None:
        try:   # (as serve holds it: one it refuses would be sent and answered 401)
            sendable_token(pydantic.SecretStr(token))
        except ValueError as exc:
            problems.append(("server.token", str(exc)))
    if problems:
        raise ConfigError(problems, source)
    key = next((f"server.{k}" for k in ("token", "token_file") if k in wanted), "")
    written = wanted.get("token")
    names = tuple(dict.fromkeys(m.group(1) for m in _ENV_REF.finditer(written) if m.group(1))) \
        if isinstance(written, str) else ()
    return Access(api_url(host, port), token, key, names)


def api_url(host: str, port: int) -> str:
    """The URL a local client reaches the relay's API at, listening on ``host:port`` (any
    address: loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"


def read_listen(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> str:
    """The API's URL from ``server.listen`` alone, read as serve reads it (``${VAR}``
    expanded: the image's HEALTHCHECK failed on ``"${RELAY_LISTEN}"``), the rest of the file
    unread: a config edit the running relay rightly refused must not fail its liveness
    check. ConfigError if it cannot be read."""
    source = str(path)
    try:
        server = parse_yaml(Path(path).read_text(encoding="utf-8"), source).get("server")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read config file: {exc}")], source) from exc
    listen = server.get("listen") if isinstance(server, dict) else None
    problems: list[tuple[str, str]] = []
    listen = interpolate(listen, "server.listen", os.environ if env is None else env, problems)
    try:
        host, port = split_listen(str(listen or ServerConfig().listen))
    except ValueError as exc:
        problems.append(("server.listen", str(exc)))
    if problems:
        raise ConfigError(problems, source)
    return api_url(host, port)


def _resolve_spool_path(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    spool = data.get("spool", {})   # (no section: the default path, beside the config too)
    if not isinstance(spool, dict):
        return data
    path = spool.get("path", SpoolConfig.model_fields["path"].default)
    if not isinstance(path, str) or not path or Path(path).is_absolute():
        return data
    return {**data, "spool": {**spool, "path": str(base_dir / path)}}


_Section = TypeVar("_Section", bound=pydantic.BaseModel)
_SECTIONS: dict[str, type[pydantic.BaseModel]] = {
    "server": ServerConfig, "spool": SpoolConfig, "delivery": DeliveryConfig,
    "health": HealthConfig}


def _valid_parts(data: dict[str, Any], source: str) -> tuple[Config, frozenset[str], tuple[int, ...]]:
    """The config made of what validates on its own: each section without its broken keys
    (their defaults stand in), the destination entries that validate. Also the paths of the
    broken keys (``delivery.timeout``; ``delivery`` for a section that is no mapping) and the
    file index of each destination kept. Its problems were already reported by the whole-file
    pass."""
    parts: dict[str, Any] = {}
    broken: set[str] = set()
    for name, model in _SECTIONS.items():
        if name in data:
            parts[name], gone = _salvage(model, data[name])
            broken |= {f"{name}.{key}" if key != "" else name for key in gone}
    kept: list[Destination] = []
    positions: list[int] = []
    entries = data.get("destinations")
    if isinstance(entries, list):
        for i, entry in enumerate(entries):
            try:
                kept.append(Destination.model_validate(entry))
                positions.append(i)
            except pydantic.ValidationError:
                pass
    elif entries is not None:
        broken.add("destinations")
    # Too many is a problem the whole-file pass reported; the valid parts keep the first ones.
    del kept[MAX_DESTINATIONS:], positions[MAX_DESTINATIONS:]
    return (Config(**parts, destinations=tuple(kept), source=source), frozenset(broken),
            tuple(positions))


def _salvage(model: type[_Section], value: Any) -> tuple[_Section, set[Any]]:
    """``value`` validated as ``model`` without the keys that fail (each section's fields have
    defaults and are checked on their own), and those keys; its defaults and ``{""}`` when
    ``value`` is no mapping."""
    gone: set[Any] = set()
    while isinstance(value, dict):
        try:
            return model.model_validate({k: v for k, v in value.items() if k not in gone}), gone
        except pydantic.ValidationError as exc:
            bad = {err["loc"][0] for err in exc.errors() if err["loc"]}
            if not bad or bad <= gone:
                break
            gone |= bad
    return model(), {""}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Merge keys (`<<: *defaults`) as YAML defines them: the merged pairs come first, and the
    # mapping's own keys override them; only its own keys must not repeat.
    own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    merged = len(node.value) - own
    mapping: dict[Any, Any] = {}
    mine: set[Any] = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value such as a name, not a list or a "
                            "mapping", key_node.start_mark) from None
        if index >= merged:
            if key in mine:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            mine.add(key)
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(node: Any, path: str, env: Mapping[str, str], problems: list[tuple[str, str]],
                unset: list[tuple[str, str]] | None = None) -> Any:
    """``node`` with its ``${VAR}`` references expanded from ``env``; what cannot be is added
    to ``problems`` (an unset variable is read as "", and its path and name also added to
    ``unset``)."""
    if isinstance(node, dict):
        return {k: interpolate(v, _join(path, k), env, problems, unset) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, f"{path}[{i}]", env, problems, unset)
                for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append((path, unset_variable(path, name)))
        if unset is not None:
            unset.append((path, name))
        return ""

    # "${" that is no reference (${A-x}, ${A B}, a fallback holding another reference) would
    # be sent as it is: say so instead
    if "${" in _ENV_REF.sub(lambda m: "${" if "${" in (m.group(2) or "") else "", node):
        problems.append((path, "a ${...} that is not ${NAME} or ${NAME:-fallback} (a fallback "
                               "cannot hold another ${...}; $$ is a literal $)"))
        return node
    return _ENV_REF.sub(replace, node)


def unset_variable(path: str, name: str, empty_ok: bool | None = None) -> str:
    """What to do about ``${name}`` unset in the value at ``path``: set it; and where the key
    has a ``*_file`` form, or takes the value the reference leaves read as "" (``empty_ok``;
    None: not known), say so. ``${NAME:-}`` was offered everywhere, and a required key then
    failed on its empty value."""
    parent, _, key = path.rpartition(".")
    by_file = f"{key}_file" in SECRET_FILE_KEYS and not re.search(
        r"(^|\.)(headers|fields|claims|tls)(\.|$)", parent)   # (free-form maps, file paths)
    instead = f" (or put the value in a file and name it in {key}_file)" if by_file else ""
    if empty_ok is False:
        return f"environment variable {name} is not set, and {key} cannot do without it: " \
               f"set it{instead}"
    if empty_ok:
        return f"environment variable {name} is not set: set it{instead}, or write " \
               f"${{{name}:-}} to accept it unset (read as empty)"
    return f"environment variable {name} is not set: set it{instead}"


def _read_secret_files(node: Any, path: str, base: Path, problems: list[tuple[str, str]]) -> Any:
    if isinstance(node, list):
        return [_read_secret_files(v, f"{path}[{i}]", base, problems) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[Any, Any] = {}
    if path.endswith((".headers", ".fields", ".claims")):
        return node   # free-form maps: a header or field named token_file is just a name
    if path.endswith(".tls") or path == "tls":
        return {key: str(base / value) if key in TLS_FILE_KEYS and isinstance(value, str) and value
                else value for key, value in node.items()}
    for key, value in node.items():
        if key in SECRET_FILE_KEYS:
            target = key.removesuffix("_file")
            if target in node:
                problems.append((_join(path, key), f"give either {target} or {key}, not both"))
                continue
            if not isinstance(value, str) or not value:
                problems.append((_join(path, key), "expected a file path"))
                continue
            file = Path(value) if Path(value).is_absolute() else base / value
            try:
                out[target] = read_secret(file)
            except (OSError, UnicodeDecodeError) as exc:
                problems.append((_join(path, key), f"cannot read secret file: {exc}"))
                out[target] = ""  # placeholder, so the schema pass does not also say "missing"
                continue
            if not out[target]:
                # (a Secret mounted wrong, or swapped half way: as "no secret", an emptied
                # server.token_file turned the API's authentication off)
                problems.append((_join(path, key), f"the secret file {file} is empty"))
        else:
            out[key] = _read_secret_files(value, _join(path, key), base, problems)
    return out


MAX_SECRET_BYTES = 1 << 20   # a token, a password or a PEM key is a few KiB


def read_secret(file: Path) -> str:
    """A secret file's text without the white space around it: a regular file of at most
    MAX_SECRET_BYTES, else OSError saying why. Opened without waiting: reading a FIFO blocked
    `relay check-config` for good, and a reload with it (holding the reload lock: every later
    edit and SIGHUP waited too); /dev/zero was read until memory ran out."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError:
        raise OSError(f"the path {str(file)!r} holds a NUL byte") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{file} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_BYTES:
        raise OSError(f"{file} is larger than {MAX_SECRET_BYTES:,} bytes: not a secret")
    return data.decode("utf-8").strip()


# Where each key belongs, for "unknown key" messages: a key that exists in another section is
# named as misplaced ("timeout belongs under delivery or a destination"), not as a typo.
_MODELS: tuple[tuple[type[pydantic.BaseModel], str], ...] = (
    (Config, "the top level"), (ServerConfig, "server"), (SpoolConfig, "spool"),
    (PostgresConfig, "spool.postgres"), (DeliveryConfig, "delivery"), (HealthConfig, "health"),
    (Destination, "a destination"), (AjoConfig, "a destination's ajo"),
    (SandboxConfig, "a destination's ajo.sandbox"), (BearerAuth, "a destination's auth"),
    (BasicAuth, "a destination's auth"), (JwtAuth, "a destination's auth"),
    (HmacAuth, "a destination's auth"), (OAuth2Auth, "a destination's auth"),
    (RateLimit, "a rate_limit"), (TlsConfig, "a destination's tls"),
    (TemplateConfig, "a destination's template"),
    (TemplateVariant, "a template variant"), (JsonBody, "a template body"),
    (RawBody, "a template body"))


def _key_homes() -> dict[str, tuple[str, ...]]:
    homes: dict[str, list[str]] = {}
    for model, where in _MODELS:
        for name, field in model.model_fields.items():
            if name == "source":
                continue
            for key in {field.alias or name, name.rstrip("_")}:
                if where not in homes.setdefault(key, []):
                    homes[key].append(where)
    for key in SECRET_FILE_KEYS:  # token_file lives where token does
        homes.setdefault(key, list(homes.get(key.removesuffix("_file"), [])))
    return {key: tuple(where) for key, where in homes.items()}


KEY_HOMES = _key_homes()


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)
