"""The one CLI, ``edgekeeper``, with subcommands.

Each pipeline half registers its own subcommands (``register(subparsers)`` in the modules listed
in COMMAND_MODULES), so this file stays small. A command handler gets the parsed args and the
validated Config and returns an exit code; long-running ones run under edgekeeper.runtime (signals,
drain deadline). Errors the user can fix (EdgekeeperError) are printed as one clear message with
the fix and a non-zero exit code; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from edgekeeper import __version__
from edgekeeper.errors import EdgekeeperError

# Modules that add subcommands; each exposes register(subparsers). Explicit beats discovery.
COMMAND_MODULES = (
    "edgekeeper.device.cli",
    "edgekeeper.cloud.cli",
    "edgekeeper.device.link_cli",
    "edgekeeper.demo",
)

Handler = Callable[[argparse.Namespace, Any], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgekeeper",
        description="Edge-to-cloud event pipeline: gate on the device, reason in the cloud.",
    )
    parser.add_argument("--version", action="version", version=f"edgekeeper {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config file (default: $EDGEKEEPER_CONFIG, else built-in defaults)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--drain-seconds", type=_positive, metavar="S",
        help="how long a stopping command may take to finish what it holds before it exits "
        "non-zero, logging what was in flight (default 20: under systemd's 30 s stop timeout)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in (0, 3600]")
    return value


def user_error(exc: BaseException) -> EdgekeeperError | None:
    """The EdgekeeperError behind ``exc``: itself, or the first one inside an exception group
    (a TaskGroup wraps a failing task's error; the user should still see one clear message)."""
    if isinstance(exc, EdgekeeperError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = user_error(inner)
        if found is not None:
            return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    from edgekeeper import config as config_mod
    from edgekeeper import log

    try:
        config = config_mod.load(args.config)
        log.configure(args.log_level or config.log.level, config.log.format)
        log.bind_context(device_id=config.device.id)
        return handler(args, config)
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        print(f"edgekeeper: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("edgekeeper: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
