"""The ``relay`` command: serve, check-config.

Exit codes: 0 success, 1 invalid input (config errors), 2 usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from relay import __version__
from relay.config import Config, parse_duration
from relay.config.schema import ServerConfig, split_listen
from relay.destinations import Loaded, load
from relay.errors import ConfigError, SpoolError

T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="Durable webhook relay for mail/SMS delivery feedback.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the relay")
    serve.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    render = sub.add_parser(
        "render", help="print the exact request a destination would get for an event",
        description="Print the method, URL, headers and body that would be sent (secrets "
                    "masked) and an equivalent curl command, or why the event would be skipped.")
    render.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    render.add_argument("--destination", "-d", required=True, metavar="NAME")
    render.add_argument("event", metavar="EVENT.json", help="a local event as JSON ('-': stdin)")
    render.set_defaults(func=cmd_render)

    test = sub.add_parser("test", help="send a test event to a destination now and show the "
                                       "request and the response")
    test.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    test.add_argument("name", metavar="NAME", help="destination name")
    test.set_defaults(func=cmd_test)

    replay = sub.add_parser("replay", help="put failed deliveries back in the queue (asks the "
                                           "running relay named by the config)")
    replay.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    replay.add_argument("--id", dest="ids", action="append", default=[], metavar="DELIVERY_ID",
                        help="a delivery id (repeatable)")
    replay.add_argument("--destination", metavar="NAME", help="every failed delivery of NAME")
    replay.add_argument("--since", metavar="TIME",
                        help="failed since TIME: RFC 3339, or a duration ago such as 2h")
    replay.add_argument("--all", action="store_true", help="every failed delivery")
    replay.set_defaults(func=cmd_replay)

    health = sub.add_parser("healthcheck", help="exit 0 if the relay answers /healthz (for "
                                                "container HEALTHCHECKs: no curl needed)")
    health.add_argument("-c", "--config", metavar="FILE",
                        help="read server.listen from FILE (nothing else is read or checked)")
    health.add_argument("--url", help="base URL (default: from the config, else "
                                      "http://127.0.0.1:8080)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=cmd_healthcheck)

    sink = sub.add_parser("sink", help="run a local receiver that prints what it gets")
    sink.add_argument("--port", type=int, default=9000)
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("-c", "--config", metavar="FILE",
                      help="relay config: verify JWT/HMAC of matching destinations")
    sink.set_defaults(func=cmd_sink)
    return parser


def cmd_check_config(args: argparse.Namespace) -> int:
    from relay.config.lint import config_warnings

    try:
        config = load(args.file).config
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    for path, message in config_warnings(config):  # likely mistakes: said, not refused
        print(f"warning: {path}: {message}", file=sys.stderr)
    print(f"OK: {args.file} ({len(config.destinations)} destinations)")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from relay.preview import preview

    loaded = _load_or_exit(args.config)
    try:
        raw = sys.stdin.buffer.read() if args.event == "-" else Path(args.event).read_bytes()
    except OSError as exc:
        print(f"relay render: cannot read {args.event}: {exc.strerror}", file=sys.stderr)
        return 1
    text, ok = preview(loaded, args.destination, raw)
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
    answer = _run(test_send(config, target))
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return 0 if answer.get("outcome") == "delivered" else 1


def cmd_replay(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request
    from datetime import datetime

    config = _load_or_exit(args.config).config
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
    host, port = config.server.host_port
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1/deliveries/retry"
    headers = {"Content-Type": "application/json"}
    if config.server.token:
        headers["Authorization"] = f"Bearer {config.server.token.get_secret_value()}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"relay replay: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relay replay: cannot reach the relay at {url}: {exc}", file=sys.stderr)
        return 1
    print(f"replayed {len(answer['replayed'])} deliveries")
    for delivery_id in answer["replayed"]:
        print(delivery_id)
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    import urllib.request

    url = args.url
    if url is None and args.config:
        # Only the address: a config edit the running relay rightly refused must not make
        # its liveness check fail (and the container restart into that bad config).
        try:
            host, port = _listen_of(args.config)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"relay healthcheck: cannot read server.listen from {args.config}: {exc}",
                  file=sys.stderr)
            return 1
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    url = (url or "http://127.0.0.1:8080").rstrip("/") + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            ok = resp.status == 200
    except OSError as exc:
        print(f"relay healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _listen_of(path: str) -> tuple[str, int]:
    """``server.listen`` of a config file (default 127.0.0.1:8080), the rest unread."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    server = data.get("server") if isinstance(data, dict) else None
    listen = server.get("listen") if isinstance(server, dict) else None
    return split_listen(str(listen or ServerConfig().listen))


def cmd_sink(args: argparse.Namespace) -> int:
    from relay.sink import run_sink

    config = _load_or_exit(args.config).config if args.config else None
    run_sink(args.port, args.host, config)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from relay import service
    from relay.metrics import Metrics

    metrics = Metrics()
    loaded = _load_or_exit(args.config, metrics)
    if not loaded.config.destinations:
        # check-config accepts an empty list (a file being written); a relay that would store
        # events forever and deliver none must not start.
        print(f"relay serve: {args.config} has no destinations, so nothing would be delivered. "
              f"Mount your config (docker run -v $PWD/relay.yaml:/etc/relay/config.yaml:ro ..., "
              f"or the Helm chart's config.destinations) or pass -c FILE; see "
              f"config.example.yaml", file=sys.stderr)
        return 1
    _setup_logging(loaded.config)
    try:
        _run(service.run(loaded, metrics=metrics, config_path=args.config))
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


def _setup_logging(config: Config) -> None:
    from relay.logs import setup_logging

    setup_logging(config)


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it is a dependency), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop builds everywhere but Windows
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
