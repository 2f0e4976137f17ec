"""systemd's notify protocol (sd_notify), with the standard library alone.

A service started with ``Type=notify`` finds ``$NOTIFY_SOCKET`` in its environment: a datagram
socket where it says ``READY=1`` (started), ``WATCHDOG=1`` (still healthy, at least every
``$WATCHDOG_USEC``), ``STATUS=...`` (one line ``systemctl status`` shows), ``RELOADING=1`` and
``STOPPING=1``. One datagram per message, newline-separated ``KEY=value`` lines. An address
starting with ``@`` is in Linux's abstract namespace (a leading NUL byte instead); otherwise it
is a path. Without ``$NOTIFY_SOCKET`` (not under systemd, or a ``Type=simple`` unit) every call
does nothing, so the commands need no "am I supervised" branches.

libsystemd would do the same through a C library the boards may lack; the protocol is four
lines of socket code (sd_notify(3) documents it as stable). The runtime (edgekeeper/runtime.py)
owns the one Notifier of a process.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, MutableMapping

from edgekeeper.log import get_logger

log = get_logger(__name__)

# The variables systemd sets for the notify protocol; taken out of our environment once read
# (as sd_notify's unset_environment does), so a child process (a results command) never
# reports to our supervisor in our name.
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify messages to ``address`` (None: nowhere, every call is a no-op)."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address or None
        # The supervisor's watchdog period; 0: no watchdog asked for.
        self.watchdog_usec = max(0, watchdog_usec)
        self.sent: int = 0
        self.failed: int = 0
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None, *,
                 unset: bool = True) -> Notifier:
        """The Notifier ``env`` (default: os.environ) describes; ``unset`` removes the
        variables from it. WATCHDOG_USEC counts only when WATCHDOG_PID is absent or ours."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        usec = _watchdog_usec(env)
        if unset:
            for name in ENV_VARS:
                env.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1 (half the supervisor's period, as sd_watchdog_enabled(3)
        advises), or None when no watchdog was asked for."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2e6

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines. Never raises and never blocks: a full or
        vanished socket loses this message (the next one is a few seconds away)."""
        if self.address is None:
            return False
        payload = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8",
                                                                                "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, _sockaddr(self.address))
        except OSError as err:
            self.failed += 1
            if self.failed == 1 or self.failed % 100 == 0:  # say it, without flooding the log
                log.warning("notify.send_failed", socket=self.address, error=str(err),
                            failed=self.failed)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self, status: str = "") -> bool:
        return self.send("WATCHDOG=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _sockaddr(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # Linux abstract namespace
    return address


def _watchdog_usec(env: Mapping[str, str]) -> int:
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return 0  # meant for another process (our parent, before an exec)
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0
    return usec if usec > 0 else 0


__all__ = ["ENV_VARS", "Notifier"]
