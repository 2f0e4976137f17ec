"""Logging with structlog: JSON lines for journald, a readable console on a TTY.

Events are named ``component.event`` (``uplink.sent``, ``trigger.fired``; tests/test_log_events.py
checks every literal) with one field vocabulary (``device_id``, ``seq``, ``label``, ``model``,
``error``, ``fix``). ``bind_context`` adds values to every later line of the process.

Secrets never reach a log: ``_redact`` replaces the value of every field whose name is one of
``SECRET_FIELDS``, whatever code logged it. Exact names, not substrings: ``input_tokens`` and
``max_tokens`` are counts, not secrets.

Libraries log through the standard library (aiohttp, asyncio, the anthropic SDK, httpx); their
records go through the same processors, so a reader sees one format. Their threshold is WARNING
unless the level is debug (httpx alone would log every call to the provider at INFO).

Native libraries write to file descriptor 2 behind Python's back: OpenCV and FFmpeg are told
to keep quiet (OPENCV_LOG_LEVEL, OPENCV_FFMPEG_LOGLEVEL, set before cv2 is imported; at debug
they speak), and ``native_output`` captures what TFLite prints while a model loads ("INFO:
Created TensorFlow Lite XNNPACK delegate") and logs it as ``native.output``: at DEBUG, or at
WARNING for a line that says WARNING or ERROR. So every line on stderr is one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

# Field names whose values are secrets, compared exactly and case-insensitively (a header's
# "Authorization" too). Only names: a secret inside another field's text (a URL with a password)
# is the logging call's to leave out. Add a name here when code starts to log a new secret.
SECRET_FIELDS = frozenset({
    "api_key", "apikey", "x_api_key", "x-api-key",  # the LLM provider's key (ANTHROPIC_API_KEY)
    "authorization", "proxy_authorization", "proxy-authorization", "cookie", "set_cookie",
    "token", "enrollment_token", "access_token", "refresh_token",  # `edgekeeper cloud token`
    "password", "passwd", "secret", "client_secret",
    "private_key", "secret_key", "signing_key", "box_key", "box_sk", "sign_sk",  # device keys
})
REDACTED = "[redacted]"


def _redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in list(event_dict):
        if key.lower() in SECRET_FIELDS:
            event_dict[key] = REDACTED
    return event_dict


class _CurrentStderr:
    """Writes to whatever sys.stderr is *now* (not the one at configure time): a CLI run inside
    a test, or a process that redirects stderr later, never logs to a closed stream."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _LibraryNoise(logging.Filter):
    """aiohttp logs every request it cannot even parse (a bad chunk size, a non-HTTP probe) at
    ERROR with a traceback. On an Internet-facing ingest that is scanners and broken clients,
    not a fault of ours, and it already answered 400: one INFO line with the reason instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if (
            exc is not None
            and record.name.startswith("aiohttp")
            and type(exc).__module__ == "aiohttp.http_exceptions"
        ):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "malformed_http_request remote=%s reason=%s"
            record.args = (remote, str(getattr(exc, "message", exc)).splitlines()[0][:200])
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


# StreamHandler is generic in typeshed but not subscriptable at run time before Python 3.11.
class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the one handler configure() installs, so a second call replaces it and leaves
    anyone else's (pytest's caplog) alone."""


def _route_stdlib(level: str, stream: Any, renderer: Any) -> None:
    handler = _OurHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _redact,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    handler.addFilter(_LibraryNoise())
    threshold = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    handler.setLevel(threshold)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)


def quiet_native_libraries(level: str) -> None:
    """Tell OpenCV, FFmpeg (through OpenCV) and TensorFlow how much to print, before they are
    imported. A value the operator set in the environment is kept."""
    debug = level.lower() == "debug"
    os.environ.setdefault("OPENCV_LOG_LEVEL", "INFO" if debug else "ERROR")
    # av_log levels: -8 quiet, 16 error, 32 info. A damaged stream's "[h264 @ 0x..] error
    # while decoding" comes here once per frame: the source's own counters tell it better.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "32" if debug else "-8")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if debug else "2")
    if "cv2" in sys.modules:  # imported already (a test, a reload): its own call still works
        with contextlib.suppress(Exception):
            sys.modules["cv2"].setLogLevel(4 if debug else 2)  # 4 INFO, 2 ERROR


_native_lock = threading.Lock()


@contextlib.contextmanager
def native_output(component: str) -> Iterator[None]:
    """Capture what native code writes to fd 2 during the block (a model load), then log it:
    JSON lines (ours, from another thread meanwhile) go out unchanged, others as
    ``native.output``. Keep the block short: the whole process's fd 2 is redirected."""
    log = get_logger("edgekeeper.native")
    with _native_lock, tempfile.TemporaryFile() as captured:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2 (closed, a test's capture): leave it
            yield
            return
        try:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        captured.seek(0)
        for raw in captured.read().decode("utf-8", "replace").splitlines():
            line = raw.strip()
            if not line:
                continue
            if _is_json_object(line):
                sys.stderr.write(line + "\n")
            elif line.upper().startswith(("WARNING", "ERROR", "FATAL", "[ WARN", "[ERROR")):
                log.warning("native.output", component=component, line=line[:2000])
            else:
                log.debug("native.output", component=component, line=line[:2000])


def _is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog once, at the CLI. ``fmt``: auto | json | console."""
    quiet_native_libraries(level)
    stream = stream or _CurrentStderr()
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper())  # logging.DEBUG ... (3.10 has no name mapping API)
        ),
        # WriteLogger: each line is one write() (PrintLogger's print() makes two: the text, then
        # "\n"), so processes sharing one stderr (`cloud serve --workers N` under journald)
        # never interleave two JSON objects on one line.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(level, stream, renderer)


def bind_context(**values: Any) -> None:
    """Attach values (device_id, model versions) to every later log line of this process."""
    structlog.contextvars.bind_contextvars(**values)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
