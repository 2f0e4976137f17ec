"""A parent that owns a few child processes: ``cloud serve --workers N`` (docs/scaling.md).

``ProcessGroup(children).run(stop)`` is a service for ``runtime.run``: the runtime keeps the
signals (this module installs no handler), the group does what they mean for its children:

* at start, each child is spawned (its output goes where the parent's goes: the journal);
* a child that dies while the group runs is started again after the project's backoff
  (edgekeeper/backoff.py): full jitter, growing while it keeps dying young, reset once a child
  has lived ``settled_s`` (a crash loop does not spin; a one-off crash restarts within a second);
* ``reload()`` (the runtime's SIGHUP) sends SIGHUP to every live child;
* ``stop`` (SIGTERM or SIGINT to the parent) sends SIGTERM to every child, which drains under its
  own runtime; the group returns once all have exited, and raises ``ChildrenFailed`` if any of
  them did not drain cleanly (exit status not 0; killed by that SIGTERM counts as clean: the
  child was still starting), so the parent's exit status says so too;
* if the parent's own drain deadline cancels the group, what is still alive is killed: a child
  never outlives its parent's drain.

The children are plain commands (argv, environment): this module knows nothing of the ingest.
``on_exit(pid)`` is called after each child has exited (the ingest forgets its metrics files).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from edgekeeper import compat, runtime
from edgekeeper.backoff import Backoff
from edgekeeper.errors import EdgekeeperError
from edgekeeper.log import get_logger

log = get_logger(__name__)

# First restart within a second (uniform in [0, 1]); a child that keeps dying waits up to 30 s.
RESTART_BASE_S = 1.0
RESTART_CAP_S = 30.0
# A child that ran this long was healthy: its next death restarts it fast again.
SETTLED_S = 30.0


class ChildrenFailed(EdgekeeperError):
    """One or more children ended their drain with a non-zero status."""


@dataclass(frozen=True)
class Child:
    """One child to keep running: a name for the logs, its command line and environment."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


def describe(code: int) -> str:
    """An exit status as a person reads it: "exit 1", "killed by SIGKILL"."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


class ProcessGroup:
    """Keeps ``children`` running until ``stop``; see the module docstring."""

    def __init__(self, children: list[Child], *,
                 on_exit: Callable[[int], None] | None = None,
                 restart_base_s: float = RESTART_BASE_S, restart_cap_s: float = RESTART_CAP_S,
                 settled_s: float = SETTLED_S) -> None:
        self.children = children
        self.on_exit = on_exit
        self.restart_base_s = restart_base_s
        self.restart_cap_s = restart_cap_s
        self.settled_s = settled_s
        self.procs: dict[str, asyncio.subprocess.Process] = {}  # the live one per child
        self.restarts = 0
        self._failed: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        async with compat.TaskGroup() as tg:
            for child in self.children:
                tg.create_task(self._keep(child, stop), name=f"child {child.name}")
        if self._failed:
            raise ChildrenFailed(
                "not every child drained cleanly: " + "; ".join(self._failed),
                fix="see the log lines of the children named for why they failed",
            )

    async def reload(self) -> None:
        """SIGHUP to every live child: each reloads under its own runtime."""
        for name, proc in list(self.procs.items()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGHUP)
                log.info("processes.reload_sent", child=name, pid=proc.pid)

    async def _keep(self, child: Child, stop: asyncio.Event) -> None:
        """One child's life: start it, wait for it or for ``stop``, restart it or drain it."""
        backoff = Backoff(self.restart_base_s, self.restart_cap_s)
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            proc = await asyncio.create_subprocess_exec(
                *child.argv, env=dict(child.env), stdin=asyncio.subprocess.DEVNULL)
            self.procs[child.name] = proc
            started = loop.time()
            log.info("processes.child_started", child=child.name, pid=proc.pid)
            try:
                code = await self._wait(proc, stop)
            except BaseException:
                # Cancelled (the parent's drain deadline passed): leave no child behind.
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    log.error("processes.child_killed", child=child.name, pid=proc.pid,
                              why="the parent's drain deadline passed")
                raise
            finally:
                if proc.returncode is not None:
                    self._exited(proc.pid)
            if stop.is_set():
                # Killed by the SIGTERM itself: it was still starting (its runtime had not yet
                # taken the signal), so it held nothing to drain.
                if code in (0, -signal.SIGTERM):
                    log.info("processes.child_drained", child=child.name, pid=proc.pid,
                             status=describe(code))
                else:
                    self._failed.append(f"{child.name} (pid {proc.pid}): {describe(code)}")
                    log.error("processes.child_drain_failed", child=child.name, pid=proc.pid,
                              status=describe(code))
                return
            lived = loop.time() - started
            if lived >= self.settled_s:
                backoff.reset()
            delay = backoff.next_delay()
            self.restarts += 1
            log.warning("processes.child_died", child=child.name, pid=proc.pid,
                        status=describe(code), lived_s=round(lived, 1),
                        restart_in_s=round(delay, 2))
            if await runtime.sleep(stop, delay):
                return

    async def _wait(self, proc: asyncio.subprocess.Process, stop: asyncio.Event) -> int:
        """The child's exit status; once ``stop`` is set, after asking it to drain."""
        exited = asyncio.Event()
        waiter = asyncio.ensure_future(proc.wait())
        waiter.add_done_callback(lambda _: exited.set())
        try:
            await runtime.sleep(stop, math.inf, wake=exited)
            if proc.returncode is None:  # stopping: ask it to drain (its runtime's SIGTERM)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            return await asyncio.shield(waiter)
        finally:
            if not waiter.done():
                waiter.cancel()

    def _exited(self, pid: int) -> None:
        if self.on_exit is not None:
            try:
                self.on_exit(pid)
            except Exception as err:  # bookkeeping only: never stops the supervision
                log.warning("processes.on_exit_failed", pid=pid, error=str(err)[:300])


__all__ = ["Child", "ChildrenFailed", "ProcessGroup", "describe"]
