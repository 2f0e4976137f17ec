"""A small exception tree shaped by what the caller should do.

Every user-facing error carries the fix: the CLI prints ``str(err)`` and exits non-zero, never a
traceback. Code below the CLI raises these; only ``edgekeeper.cli`` turns them into exit codes.
"""

from __future__ import annotations


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


class ConfigError(PermanentError, ValueError):
    """The configuration file or an EDGEKEEPER_* variable holds a bad value."""

    exit_code = 2


class InputError(PermanentError, ValueError):
    """A recording, model, labels file or camera the user pointed at cannot be used."""

    exit_code = 3


class ModelError(InputError):
    """A model file, its manifest or its labels are missing, corrupt or inconsistent."""
