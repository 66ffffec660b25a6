"""The ``relay`` command: serve, check-config.

Exit codes: 0 success, 1 invalid input (config errors), 2 usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from relay import __version__
from relay.config import Config, load_config
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
    return parser


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"OK: {args.file} ({len(config.destinations)} destinations)")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from relay.preview import preview

    config = _load_or_exit(args.config)
    try:
        raw = sys.stdin.buffer.read() if args.event == "-" else Path(args.event).read_bytes()
    except OSError as exc:
        print(f"relay render: cannot read {args.event}: {exc.strerror}", file=sys.stderr)
        return 1
    text, ok = preview(config, args.destination, raw)
    print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    _setup_logging(config)
    from relay import service

    try:
        _run(service.run(config))
    except SpoolError as exc:
        logging.getLogger("relay").error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from exc


def _setup_logging(config: Config) -> None:
    level = os.environ.get("RELAY_LOG_LEVEL", config.server.log_level).upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it is a dependency), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop builds everywhere but Windows
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
