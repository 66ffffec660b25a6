"""The ``relay`` command: serve, check-config, config-reference, render, test, replay,
healthcheck, sink. Every subcommand takes ``-c/--config FILE``.

Exit codes: 0 success, 1 invalid input (config errors), 2 usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from relay import __version__
from relay.config import Config, parse_duration
from relay.config.load import Access
from relay.destinations import Loaded, load
from relay.errors import ConfigError, SpoolError

T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # the reader went away (`relay render ... | head`): no traceback, and none at exit
        # when Python flushes stdout again (the idiom of the signal module's documentation)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="Durable webhook relay for mail/SMS delivery feedback: takes "
        "local events on HTTP, stores them, and delivers them to AJO, Braze and Liquid-templated "
        "webhooks with retries. Every command takes -c/--config FILE.",
        epilog="Exit codes: 0 success, 1 failure (invalid config, unreachable relay, ...), "
               "2 usage error. Docs: README.md and docs/ in the repository.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description)

    def config_option(cmd: argparse.ArgumentParser, required: bool = True,
                      text: str = "the relay's YAML config file") -> None:
        cmd.add_argument("-c", "--config", required=required, metavar="FILE", help=text)

    serve = command("serve", "run the relay",
                    "Run the relay: the HTTP API on server.listen, the spool, delivery. SIGHUP "
                    "(or a changed config file) reloads; SIGTERM drains and exits 0.")
    config_option(serve)
    serve.add_argument("--port", "--listen", "--host", nargs="?", action=_AddressFromConfig,
                       help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    check = command("check-config", "validate a config file and exit",
                    "Validate a config file as serve would (every problem at once, each with its "
                    "path), print warnings about likely mistakes, and exit 0 (valid) or 1.")
    config_option(check, required=False)
    check.add_argument("file", metavar="FILE", nargs="?",
                       help="the config file (the same as -c FILE)")
    check.set_defaults(func=cmd_check_config)

    reference = command("config-reference", "print every config key as Markdown",
                        "Print the configuration reference (every key with its type, default and "
                        "meaning) generated from the schema; docs/configuration.md is its output.")
    reference.add_argument("-c", "--config", metavar="FILE",
                           help="accepted for symmetry with other commands; not read")
    reference.set_defaults(func=cmd_config_reference)

    render = command(
        "render", "print the exact request a destination would get for an event",
        "Print the method, URL, headers and body that would be sent (secrets masked) and an "
        "equivalent curl command, or why the event would be skipped. Nothing is sent.")
    config_option(render)
    render.add_argument("--destination", "-d", required=True, metavar="NAME",
                        help="the destination's name in the config")
    render.add_argument("event", metavar="EVENT.json", help="a local event as JSON ('-': stdin)")
    render.set_defaults(func=cmd_render)

    test = command("test", "send a test event to a destination now and show the request and "
                           "the response",
                   "Send a synthetic event straight to one destination (no relay running, no "
                   "spool) and print the request as sent (secrets masked) and the answer. Exit 0 "
                   "when the destination accepted it. Secrets the receiver echoes back are "
                   "**** in its answer, as written or JSON-escaped: the auth secrets and what "
                   "the relay made of them (Authorization value, JWT, signatures, OAuth2 "
                   "token), and configured header and query values whose name holds auth "
                   "(not author), key, token, secret, passw, passphrase, signature, hmac, "
                   "session, cookie, credential, jwt or private, or the word sig, code, pass, "
                   "pwd or pw, or that start with Bearer, Basic or Token. Other values "
                   "(X-Env: production) are shown as echoed.")
    config_option(test)
    test.add_argument("name", metavar="NAME", help="destination name")
    test.set_defaults(func=cmd_test)

    replay = command("replay", "put failed deliveries back in the queue",
                     "Ask the running relay (at the config's server.listen, with server.token) "
                     "to make failed deliveries pending again, due now, with fresh retry "
                     "windows. Only server.listen and the token are read from the config. Exit 1 "
                     "when a given --id is unknown or not failed, or --destination is not in "
                     "the running relay's config.")
    config_option(replay)
    replay.add_argument("--id", dest="ids", action="append", default=[], metavar="DELIVERY_ID",
                        help="a failed delivery's id (repeatable)")
    replay.add_argument("--destination", metavar="NAME", help="every failed delivery of NAME")
    replay.add_argument("--since", metavar="TIME",
                        help="failed since TIME: RFC 3339, or a duration ago such as 2h")
    replay.add_argument("--all", action="store_true", help="every failed delivery")
    replay.set_defaults(func=cmd_replay)

    health = command("healthcheck", "exit 0 if the relay answers /healthz",
                     "Exit 0 if the relay answers GET /healthz with 200, else 1: a container "
                     "HEALTHCHECK that needs no curl. Reads only server.listen from the config "
                     "(nothing else is read or checked).")
    config_option(health, required=False, text="read server.listen from FILE (only that)")
    health.add_argument("--url", help="base URL (default: from the config, else "
                                      "http://127.0.0.1:8080)")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="give up after this many seconds (default 3)")
    health.set_defaults(func=cmd_healthcheck)

    sink = command("sink", "run a local receiver that prints what it gets (and fails on demand)",
                   "A local HTTP receiver for trying the relay: prints every request, checks "
                   "JWT/HMAC signatures of the config's destinations, and answers 200 unless "
                   "told to fail. --status, --fail-rate and --delay take VALUE (every path) or "
                   "PATH=VALUE (paths starting with PATH; the longest match wins) and repeat. "
                   "With -c, a path that no destination's url (nor a PATH= rule) has is "
                   "answered 404 saying so; the relay's own paths (/v1/events...) with where "
                   "the relay listens.")
    sink.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    sink.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                          "127.0.0.1)")
    config_option(sink, required=False,
                  text="relay config: verify JWT/HMAC of matching destinations, and answer "
                       "404 to paths none of them posts to")
    sink.add_argument("--status", action="append", default=[], metavar="[PATH=]CODE",
                      help="answer CODE instead of 200, e.g. 503 or /braze=503")
    sink.add_argument("--fail-rate", action="append", default=[], metavar="[PATH=]SHARE",
                      help="answer 503 to this share of requests, e.g. 0.5")
    sink.add_argument("--delay", action="append", default=[], metavar="[PATH=]DURATION",
                      help="wait this long before answering, e.g. 2s or /crm=500ms")
    sink.set_defaults(func=cmd_sink)
    return parser


class _AddressFromConfig(argparse.Action):
    """``serve --port/--listen/--host``: a usage error saying where the address comes from
    (argparse's own was the top-level usage and "unrecognized arguments: --port 8081")."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        value = values if isinstance(values, str) else ""
        listen = {"--port": f"127.0.0.1:{value or 8081}",
                  "--host": f"{value or '0.0.0.0'}:8080"}.get(option_string or "",
                                                             value or "127.0.0.1:8081")
        file = getattr(namespace, "config", None) or "FILE"
        parser.error(f"{option_string}: serve takes its address from server.listen in the "
                     f"config (-c {file}): set it there (server: {{listen: \"{listen}\"}}), "
                     f"or choose it per run with listen: \"${{RELAY_LISTEN:-127.0.0.1:8080}}\" "
                     f"there and RELAY_LISTEN={listen} relay serve -c {file}")


def cmd_check_config(args: argparse.Namespace) -> int:
    from relay.config.lint import config_warnings
    from relay.preview import json_body_warnings

    if args.file and args.config and args.file != args.config:
        print("relay check-config: give the file once (FILE or -c FILE)", file=sys.stderr)
        return 2
    file = args.config or args.file
    if not file:
        print("relay check-config: which file? relay check-config -c FILE", file=sys.stderr)
        return 2
    try:
        loaded = load(file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    config = loaded.config
    # likely mistakes: said, not refused
    warnings = config_warnings(config)
    warnings += json_body_warnings(loaded, warned=[path for path, _ in warnings])
    for path, message in warnings:
        print(f"warning: {path}: {message}", file=sys.stderr)
    if not config.destinations:   # (as serve would: it refuses to start)
        print(f"relay check-config: {_no_destinations(file)}", file=sys.stderr)
        return 1
    print(f"OK: {file} ({_count(len(config.destinations), 'destination')})")
    return 0


def _count(n: int, noun: str, plural: str = "") -> str:
    """``1 destination``, ``3 destinations``, ``0 deliveries``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _no_destinations(file: str) -> str:
    """Why a config without destinations is refused, and how to give the relay one."""
    return (f"{file} has no destinations, so nothing would be delivered. Mount your config "
            f"(docker run -v $PWD/relay.yaml:/etc/relay/config.yaml:ro ..., or the Helm "
            f"chart's config.destinations) or pass -c FILE; see config.example.yaml")


def cmd_config_reference(args: argparse.Namespace) -> int:
    from relay.config.reference import reference

    sys.stdout.write(reference())
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from relay.preview import preview

    loaded = _load_or_exit(args.config)
    try:
        raw = sys.stdin.buffer.read() if args.event == "-" else Path(args.event).read_bytes()
    except OSError as exc:
        print(f"relay render: cannot read {args.event}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        text, ok = preview(loaded, args.destination, raw)
    except Exception as exc:  # a command for people: one line, no traceback
        text, ok = _unexpected("relay render", exc), False
    print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_test(args: argparse.Namespace) -> int:
    import json

    from relay.testsend import test_send

    config, destinations = _load_or_exit(args.config)
    target = destinations.get(args.name)
    if target is None:
        names = ", ".join(d.name for d in config.destinations) or "none configured"
        print(f"relay test: no destination {args.name!r} (destinations: {names})",
              file=sys.stderr)
        return 1
    try:
        answer = _run(test_send(config, target))
    except Exception as exc:  # a command for people: one line, no traceback
        print(_unexpected("relay test", exc), file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return 0 if answer.get("outcome") == "delivered" else 1


def _unexpected(command: str, exc: Exception) -> str:
    """What ``render`` and ``test`` say about an error they did not foresee (a bug)."""
    return (f"{command}: unexpected error ({type(exc).__name__}: {exc}); "
            "run `relay serve` with RELAY_LOG_LEVEL=debug or report it")


def cmd_replay(args: argparse.Namespace) -> int:
    from datetime import datetime

    from relay.config.load import read_access

    body: dict[str, object] = {}
    if args.ids:
        body["delivery_ids"] = args.ids
    if args.destination:
        body["destination"] = args.destination
    if args.since:
        try:
            body["failed_since"] = datetime.fromisoformat(args.since).timestamp()
        except ValueError:
            try:
                body["failed_since"] = time.time() - parse_duration(args.since)
            except ValueError:
                print(f"relay replay: --since takes RFC 3339 or a duration such as 2h "
                      f"(got {args.since!r})", file=sys.stderr)
                return 2
    if args.all:
        body.setdefault("failed_since", 0)
    if not body:
        print("relay replay: say which: --id, --destination, --since or --all", file=sys.stderr)
        return 2
    try:
        access = read_access(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        status, answer = _api(access, "POST", "/v1/deliveries/retry", body)
        if status >= 300:
            print(f"relay replay: {status}: {answer.get('error', answer)}", file=sys.stderr)
            if status == 401:
                print(f"relay replay: {_token_hint(args.config, access)}", file=sys.stderr)
            return 1
        replayed = answer["replayed"]
        print(f"replayed {_count(len(replayed), 'delivery', 'deliveries')}")
        for delivery_id in replayed:
            print(delivery_id)
        missed = [i for i in args.ids if i not in replayed]
        for delivery_id in missed:  # say why each id given was not replayed
            status, found = _api(access, "GET", f"/v1/deliveries/{quote(delivery_id)}")
            why = f"is {found.get('state')}, not failed" if status == 200 else "is not known"
            print(f"relay replay: delivery {delivery_id!r} {why}", file=sys.stderr)
    except OSError as exc:
        print(f"relay replay: cannot reach the relay at {access.base_url}: {exc} (is it running "
              f"with this config?)", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"relay replay: the relay's answer is not JSON: {exc}", file=sys.stderr)
        return 1
    return 1 if missed else 0


def _token_hint(file: str, access: Access) -> str:
    """What to check when the relay refused replay's token: replay reads server.token from
    its own -c file, with ${VARS} from its own environment, not the relay's."""
    sent = "sent no token" if access.token is None else "sent a token the relay refused"
    if access.token_vars:
        names = " and ".join(access.token_vars)
        unset = " (unset or empty here)" if access.token is None else ""
        example = f"{access.token_vars[0]}=... relay replay -c {file} ..."
        return (f"it {sent}: it takes server.token from -c {file}, which reads {names} from "
                f"this command's environment{unset}. Set {names} here too, as the relay was "
                f"started with: {example}")
    if access.token_key:
        return (f"it {sent}: it takes the token from {access.token_key} in -c {file}; the "
                f"relay was started with another token (or another config file?)")
    return (f"it {sent}: -c {file} sets no server.token, but the relay was started with one "
            f"(another config file, or its token from an environment variable?)")


def _api(access: Access, method: str, path: str,
         body: object | None = None) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of one request to the running relay's API."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if access.token:
        headers["Authorization"] = f"Bearer {access.token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(access.base_url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"error": text.decode(errors="replace")}


def cmd_healthcheck(args: argparse.Namespace) -> int:
    import urllib.request

    url = args.url
    if url is None and args.config:
        # Only the address: a config edit the running relay rightly refused must not make
        # its liveness check fail (and the container restart into that bad config).
        from relay.config.load import read_listen

        try:
            url = read_listen(args.config)
        except ConfigError as exc:
            print(f"relay healthcheck: cannot read server.listen from {args.config}: {exc}",
                  file=sys.stderr)
            return 1
    url = (url or "http://127.0.0.1:8080").rstrip("/") + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            ok = resp.status == 200
    except OSError as exc:
        print(f"relay healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def cmd_sink(args: argparse.Namespace) -> int:
    from relay.sink import SinkError, parse_rules, run_sink

    try:
        rules = parse_rules(args.status, args.fail_rate, args.delay)
    except SinkError as exc:
        print(f"relay sink: {exc}", file=sys.stderr)
        return 2
    config = _load_or_exit(args.config).config if args.config else None
    try:
        _run(run_sink(args.port, args.host, config, rules))
    except SinkError as exc:
        print(f"relay sink: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from relay import service
    from relay.metrics import Metrics

    metrics = Metrics()
    loaded = _load_or_exit(args.config, metrics)
    if not loaded.config.destinations:
        # a relay that would store events forever and deliver none must not start (nor does
        # a reload apply such a file; check-config says so too)
        print(f"relay serve: {_no_destinations(args.config)}", file=sys.stderr)
        return 1
    from relay import workers

    role = workers.role_from_env()
    if role is not None:
        workers.become_worker(role)
    _setup_logging(loaded.config, None if role is None else role.index)
    try:
        if role is None and loaded.config.server.workers > 1:
            return _run(workers.supervise(loaded, args.config))
        _run(service.run(loaded, metrics=metrics, config_path=args.config, role=role))
    except SpoolError as exc:
        logging.getLogger("relay").error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _load_or_exit(path: str, metrics: Any = None) -> Loaded:
    """The config with its destinations compiled (JWTs counted into ``metrics``), or exit 1."""
    try:
        return load(path, on_mint=metrics.mint_counter if metrics is not None else None)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from exc


def _setup_logging(config: Config, worker: int | None = None) -> None:
    from relay.logs import setup_logging

    setup_logging(config, worker)


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it is a dependency), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop builds everywhere but Windows
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
