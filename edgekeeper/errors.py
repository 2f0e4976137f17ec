"""A small exception tree shaped by what the caller should do, and where foreign errors join it.

Every user-facing error carries the fix: the CLI prints ``str(err)`` and exits non-zero, never a
traceback. Code below the CLI raises these; only ``edgekeeper.cli`` turns them into exit codes.

Errors from libraries (aiohttp, redis, psycopg, OS calls) are classified where they enter our
code, with ``classified(...)`` around the call or ``classify(err)`` in an ``except``, so every
long-running loop catches ``RetryableError`` alone and lets a ``PermanentError`` stop it.
docs/runtime.md has the whole tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sys
from collections.abc import Iterator


class EdgekeeperError(Exception):
    """Base of every error edgekeeper raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class PermanentError(EdgekeeperError):
    """Retrying will not help: bad input, bad config, a forged message."""


class RetryableError(EdgekeeperError):
    """Transient: the same call may succeed later (network, a busy server)."""


class FatalError(PermanentError):
    """Permanent for the whole service, not for one item (a rejected API key, an unknown model,
    a read-only data directory): no loop catches it; the command stops with its fix."""


class ConfigError(PermanentError, ValueError):
    """The configuration file or an EDGEKEEPER_* variable holds a bad value."""

    exit_code = 2


class InputError(PermanentError, ValueError):
    """A recording, model, labels file or camera the user pointed at cannot be used."""

    exit_code = 3


class ModelError(InputError):
    """A model file, its manifest or its labels are missing, corrupt or inconsistent."""


# --- what foreign errors become -------------------------------------------------------------


class Unreachable(RetryableError, ConnectionError):
    """A server we depend on did not answer (network, Redis, PostgreSQL, the cloud, a proxy)."""


class TimedOut(RetryableError, TimeoutError):
    """A call took longer than it is allowed to."""


class DiskFull(RetryableError, OSError):
    """No space left on a disk we write to; the write is tried again once there is room."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message, fix=fix or "free space on that disk")
        self.errno = errno.ENOSPC


class AccessDenied(FatalError, PermissionError):
    """A file or directory we must write is not ours to write (permissions, read-only mount)."""


class DrainTimeout(EdgekeeperError):
    """The command did not finish draining before its deadline (what was in flight is logged)."""


_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG})
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def _module_error(err: BaseException, module: str, name: str) -> bool:
    """``err`` is an instance of ``module.name``, checked only when that library is already
    imported (the device never imports redis or psycopg just to classify an error)."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return isinstance(cls, type) and isinstance(err, cls)


def classify(err: BaseException, what: str = "") -> EdgekeeperError | None:
    """Our error for a library's (``what`` names the call: "POST https://.../v1/events"); None
    when it is not one we know how to judge (a bug: let it surface as it is)."""
    if isinstance(err, EdgekeeperError):
        return err
    where = f"{what}: " if what else ""
    detail = f"{where}{type(err).__name__}: {err}".rstrip(": ")
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)):
        return TimedOut(f"{where}{type(err).__name__}: {err or 'timed out'}",
                        fix="check the network and that the server runs")
    if _module_error(err, "redis.exceptions", "AuthenticationError"):
        return FatalError(detail, fix="check the password in cloud.redis_url")
    if _module_error(err, "redis.exceptions", "ConnectionError") or _module_error(
        err, "redis.exceptions", "TimeoutError"
    ):
        return Unreachable(detail, fix="check that redis-server is running and reachable")
    if _module_error(err, "psycopg", "OperationalError") or _module_error(
        err, "psycopg", "InterfaceError"
    ):
        # psycopg_pool.PoolTimeout is an OperationalError too: every connection is busy or gone.
        return Unreachable(detail, fix="check that PostgreSQL is running and reachable")
    if _module_error(err, "aiohttp", "ClientError"):
        return Unreachable(detail, fix="check the URL and the network; it is tried again")
    if isinstance(err, OSError):
        if err.errno in _DISK_FULL:
            return DiskFull(detail)
        if err.errno in _DENIED:
            return AccessDenied(detail, fix="give this user write access there")
        return Unreachable(detail, fix="check the network, the disk and the path")
    return None


@contextlib.contextmanager
def classified(what: str = "") -> Iterator[None]:
    """Re-raise the errors of the calls inside (awaits included) as our own: a Retryable or a
    Permanent error, with the original as its cause. Errors we cannot judge pass unchanged."""
    try:
        yield
    except EdgekeeperError:
        raise
    except Exception as err:
        ours = classify(err, what)
        if ours is None:
            raise
        raise ours from err
