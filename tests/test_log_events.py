"""Every log event is named ``component.event`` (``uplink.sent``, ``trigger.fired``): one style,
so a reader can grep a component's events and a log pipeline can route them by prefix.

The scan reads the source (AST), so it sees every call, including ones no test executes: a call
``log.<level>(...)`` on a module's structlog logger (``log = get_logger(__name__)``) whose event
is not a string literal matching EVENT_NAME is an offender, and so is a computed event name
(``"trigger " + action``): events are literals so that they can be found by grep.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("device", "cloud", "edgekeeper", "protocol")
EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
LEVELS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "msg"})

def _loggers(tree: ast.Module) -> set[str]:
    """Module-level names bound to ``get_logger(...)`` (ours or structlog's)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == "get_logger":
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def events(source: str) -> list[tuple[int, str | None]]:
    """(line, event) of every logging call in ``source``; None for a computed event name."""
    tree = ast.parse(source)
    loggers = _loggers(tree)
    found: list[tuple[int, str | None]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        receiver = node.func.value
        if node.func.attr not in LEVELS or not (
            isinstance(receiver, ast.Name) and receiver.id in loggers
        ):
            continue
        first = node.args[0] if node.args else None
        literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
        found.append((node.lineno, first.value if literal else None))  # type: ignore[union-attr]
    return sorted(found, key=lambda item: item[0])


def _offenders() -> dict[str, list[str]]:
    offenders: dict[str, list[str]] = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            bad = [f"line {line}: {event!r}" if event is not None else f"line {line}: computed"
                   for line, event in events(path.read_text(encoding="utf-8"))
                   if event is None or not EVENT_NAME.match(event)]
            if bad:
                offenders[rel] = bad
    return offenders


@pytest.mark.slow
def test_every_event_is_component_dot_event() -> None:
    offenders = _offenders()
    assert not offenders, "events not named component.event:\n" + "\n".join(
        f"  {path}: {', '.join(bad)}" for path, bad in offenders.items()
    )


def test_the_scan_finds_loggers_and_judges_names() -> None:
    source = (
        "from edgekeeper.log import get_logger\n"
        "log = get_logger(__name__)\n"
        "log.info('uplink.sent', seq=1)\n"
        "log.warning('camera lost; reconnecting')\n"
        "log.info('trigger ' + action)\n"
        "print.info('not a logger')\n"
    )
    found = events(source)
    assert found == [(3, "uplink.sent"), (4, "camera lost; reconnecting"), (5, None)]
    assert [bool(EVENT_NAME.match(e or "")) for _, e in found] == [True, False, False]

