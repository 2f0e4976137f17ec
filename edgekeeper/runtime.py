"""The one process runtime: how every long-running command starts, stops and fails.

``run(main, name=..., drain_seconds=..., reload=...)`` runs ``main(stop)`` under one TaskGroup
beside a watchdog, with the signal handlers installed here and nowhere else:

* SIGTERM or SIGINT sets ``stop``: the service stops taking work and drains what it holds;
* from then on the drain has ``drain_seconds`` (default DRAIN_SECONDS, shorter than systemd's
  TimeoutStopSec=30); past it the watchdog logs every task still in flight, cancels the service
  and the command exits non-zero (DrainTimeout);
* a second SIGINT forces the exit now: what was in flight is logged and the process leaves with
  130, skipping every cleanup (as a SIGKILL would: what was durable stays durable);
* SIGHUP calls ``reload`` where the command has one, else it is logged and ignored; a reload
  that fails is logged and the service keeps what it had;
* under systemd (``Type=notify``) the runtime speaks sd_notify (edgekeeper/notify.py): READY=1
  (at start, or when the service says so: ``ready="service"``), WATCHDOG=1 every half
  WATCHDOG_USEC while the service's health check passes, STATUS= lines, RELOADING=1 and
  STOPPING=1. The service reaches it through ``supervisor()``.

Handlers only record the signal (as uvicorn's ``capture_signals`` does); the watchdog does the
rest. Loops wait with ``sleep(stop, seconds)``, which returns as soon as a drain starts.
docs/runtime.md tells the whole lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeVar

from edgekeeper import compat
from edgekeeper.errors import DrainTimeout, EdgekeeperError
from edgekeeper.log import get_logger
from edgekeeper.notify import Notifier

log = get_logger(__name__)

T = TypeVar("T")

# systemd's TimeoutStopSec=30 (systemd/edgekeeper-device.service) kills after 30 s: the drain
# must be over well before, so the log says what hung instead of a bare SIGKILL.
DRAIN_SECONDS = 20.0
# After a missed deadline the service is cancelled; if cancelling does not end it within this (a
# thread stuck in a blocking call), the process leaves without it.
CANCEL_GRACE_S = 0.5
FORCED_EXIT_CODE = 130  # a second Ctrl-C, as a shell reports SIGINT
# How often STATUS= is refreshed when systemd asked for no watchdog (with one: half its period).
STATUS_EVERY_S = 5.0


async def sleep(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> bool:
    """Sleep up to ``seconds``; return early when ``stop`` (or ``wake``) is set. True when
    stopping, so a loop can write ``if await sleep(stop, delay): break``. ``math.inf``: no
    limit."""
    if seconds <= 0 or stop.is_set():
        return stop.is_set()
    limit = seconds if math.isfinite(seconds) else None
    if wake is None:
        with contextlib.suppress(TimeoutError):
            async with compat.timeout(limit):
                await stop.wait()
        return stop.is_set()
    with contextlib.suppress(TimeoutError):
        async with compat.timeout(limit), compat.TaskGroup() as tg:
            waiters = [tg.create_task(stop.wait()), tg.create_task(wake.wait())]

            def first_done(_: asyncio.Task[Any]) -> None:  # the first one set ends the other
                for w in waiters:
                    w.cancel()

            for w in waiters:
                w.add_done_callback(first_done)
    return stop.is_set()


@dataclass(frozen=True)
class Health:
    """What a service's health check says: ``ok`` lets WATCHDOG=1 go out; ``status`` is the
    STATUS= line (frames/s, backlog ...); ``why`` says what is wrong when not ok."""

    ok: bool
    status: str = ""
    why: str = ""


class Supervisor:
    """The service's side of supervision: say when it is ready, and how to judge its health.

    The runtime calls the health check every half watchdog period, on the event loop: a loop
    that is blocked sends nothing, and neither does a service whose check fails; systemd then
    restarts it (WatchdogSec=). Without systemd every call is harmless and nothing is sent.
    """

    def __init__(self, notifier: Notifier, name: str) -> None:
        self.notifier = notifier
        self.name = name
        self.is_ready = False
        self.check: Callable[[], Health] | None = None
        self.healthy = True

    def ready(self, status: str = "") -> None:
        """Started: sources open, work flowing. Sent once."""
        if self.is_ready:
            return
        self.is_ready = True
        if self.notifier.ready(status):  # said only under systemd: elsewhere it is noise
            log.info("runtime.ready", service=self.name,
                     watchdog_s=self.notifier.watchdog_usec / 1e6 or None)

    def watch(self, check: Callable[[], Health]) -> None:
        """Judge health with ``check`` (cheap, synchronous) from now on."""
        self.check = check

    def beat(self) -> Health:
        """One round: judge health, send WATCHDOG=1 (if healthy and ready) and STATUS=."""
        health = Health(True, "running") if self.check is None else self.check()
        if health.ok != self.healthy:  # say it on each change, not on every round
            self.healthy = health.ok
            if health.ok:
                log.info("runtime.healthy", service=self.name, status=health.status)
            else:
                log.warning("runtime.unhealthy", service=self.name, why=health.why,
                            status=health.status,
                            watchdog="not sent: systemd restarts the service after WatchdogSec"
                            if self.notifier.watchdog_interval else "none")
        status = health.status if health.ok else f"unhealthy: {health.why}; {health.status}"
        if health.ok and self.is_ready and self.notifier.watchdog_interval:
            self.notifier.watchdog(status)
        else:
            self.notifier.status(status)
        return health


_supervisor: contextvars.ContextVar[Supervisor] = contextvars.ContextVar("edgekeeper_supervisor")


def supervisor() -> Supervisor:
    """The Supervisor of the service this code runs in (a silent one outside the runtime)."""
    try:
        return _supervisor.get()
    except LookupError:
        return Supervisor(Notifier(None), "unsupervised")


async def _pinger(sup: Supervisor, stop: asyncio.Event) -> None:
    """WATCHDOG=1 and STATUS= until the drain starts (systemd's stop timeout takes over)."""
    if not sup.notifier.enabled:
        return
    every = sup.notifier.watchdog_interval or STATUS_EVERY_S
    while not stop.is_set():
        sup.beat()
        if await sleep(stop, every):
            break


@dataclass
class _Signals:
    """What the handlers record; nothing else happens in a handler."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    force: asyncio.Event = field(default_factory=asyncio.Event)
    hup: asyncio.Event = field(default_factory=asyncio.Event)
    first: str = ""
    received: list[str] = field(default_factory=list)

    def handle(self, sig: signal.Signals) -> None:
        self.received.append(sig.name)
        if sig is signal.SIGHUP:
            self.hup.set()
        elif not self.stop.is_set():
            self.first = sig.name
            self.stop.set()
        elif sig is signal.SIGINT:
            self.force.set()


@contextlib.contextmanager
def capture_signals(state: _Signals) -> Iterator[None]:
    """Route SIGTERM, SIGINT and SIGHUP to ``state`` while the block runs."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # Off the main thread (or on Windows) there are no handlers: Ctrl-C then ends the loop.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, state.handle, sig)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def in_flight(*exclude: asyncio.Task[Any] | None) -> list[str]:
    """Every other task of this loop, as "name: where it waits (file:line)"."""
    out = []
    for task in asyncio.all_tasks():
        if task in exclude or task.done():
            continue
        out.append(f"{task.get_name()}: {_where(task)}")
    return sorted(out)


def _where(task: asyncio.Task[Any]) -> str:
    """The chain of our coroutines ``task`` is suspended in, innermost last, and the line it
    waits on (library frames, asyncio's or aiohttp's, are left out when ours are there)."""
    chain: list[tuple[str, str, int]] = []
    coro: Any = task.get_coro()
    for _ in range(50):  # bounded: a chain is never this deep
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        chain.append((frame.f_code.co_name, frame.f_code.co_filename, frame.f_lineno))
        coro = getattr(coro, "cr_await", None)
    ours = [c for c in chain if not _library(c[1])] or chain
    if not ours:
        return "(not started)"
    _, path, line = ours[-1]
    return " > ".join(c[0] for c in ours[-4:]) + f" ({os.path.basename(path)}:{line})"


def _library(path: str) -> bool:
    return path.startswith(_STDLIB) or "site-packages" in path or "dist-packages" in path


_STDLIB = os.path.dirname(os.__file__)


async def _watchdog(state: _Signals, service: asyncio.Task[Any], name: str,
                    drain_s: float, outcome: list[EdgekeeperError],
                    ours: list[asyncio.Task[Any] | None], sup: Supervisor) -> None:
    """From the first stop signal on, give the service ``drain_s`` to finish (a second SIGINT
    cuts that short), then log what is still running and cancel it."""
    await state.stop.wait()
    log.info("runtime.draining", service=name, signal=state.first or None, deadline_s=drain_s)
    sup.notifier.stopping(f"draining ({state.first or 'stop'}), up to {drain_s:g} s")
    forced = True
    try:
        async with compat.timeout(drain_s):
            await state.force.wait()
    except TimeoutError:
        forced = False
    busy = [f"{service.get_name()}: {_where(service)}",
            *in_flight(service, *ours)]
    if forced:
        # Leave now: cancelling, closing files and the interpreter's own teardown can take
        # seconds on a busy board, and the user asked twice.
        log.warning("runtime.forced_exit", service=name, in_flight=busy)
        _leave(FORCED_EXIT_CODE)
    log.error("runtime.drain_timeout", service=name, deadline_s=drain_s, in_flight=busy)
    outcome.append(DrainTimeout(
        f"{name} was still draining {drain_s:g} s after {state.first or 'the stop'}; "
        "in flight: " + "; ".join(busy)[:2000],
        fix="see the runtime.drain_timeout log line for what hung; a longer "
            "--drain-seconds gives a slow drain more time",
    ))
    service.cancel()
    await asyncio.sleep(CANCEL_GRACE_S)
    # Still here: cancelling did not end the service (a thread stuck in a blocking call keeps
    # the interpreter from exiting too). Leave without it; what is durable stays durable.
    log.error("runtime.exit_now", service=name, in_flight=in_flight(*ours))
    _leave(outcome[-1].exit_code)


def _leave(code: int) -> NoReturn:
    """Exit the process at once (no cleanup, no waiting for threads), logs flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _reloader(state: _Signals, name: str,
                    reload: Callable[[], Awaitable[None]] | None, sup: Supervisor) -> None:
    while True:
        await state.hup.wait()
        state.hup.clear()
        if reload is None:
            log.info("runtime.sighup_ignored", service=name, why="nothing to reload")
            continue
        sup.notifier.reloading()
        try:
            await reload()
        except EdgekeeperError as err:
            # A bad file or a registry that cannot be read now: keep running on what was loaded
            # before (a reload never stops a running service); the line says what to fix.
            log.error("runtime.reload_failed", service=name, error=err.message, fix=err.fix,
                      kept="the configuration loaded before")
        else:
            log.info("runtime.reloaded", service=name)
        finally:
            if sup.is_ready:
                sup.notifier.send("READY=1")  # systemd waits for it after RELOADING=1


Ready = Literal["start", "service"]


async def serve(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]], *, name: str,
                drain_seconds: float | None = None,
                reload: Callable[[], Awaitable[None]] | None = None,
                ready: Ready = "start") -> T:
    """``main(stop)`` under the runtime, in a running loop (``run`` is the synchronous entry).
    ``ready="service"``: the service calls ``supervisor().ready()`` itself once it is up."""
    drain_s = DRAIN_SECONDS if drain_seconds is None else drain_seconds
    state = _Signals()
    outcome: list[EdgekeeperError] = []
    sup = Supervisor(Notifier.from_env(), name)
    token = _supervisor.set(sup)  # the service's tasks inherit it (contextvars are copied)
    with capture_signals(state), contextlib.closing(sup.notifier):
        try:
            async with compat.TaskGroup() as tg:
                service: asyncio.Task[T] = tg.create_task(main(state.stop), name=name)
                if ready == "start":
                    sup.ready()
                # The runtime's own tasks, never "in flight" in a report.
                ours: list[asyncio.Task[Any] | None] = [asyncio.current_task()]
                helpers = [
                    tg.create_task(_watchdog(state, service, name, drain_s, outcome, ours, sup),
                                   name="runtime-watchdog"),
                    tg.create_task(_reloader(state, name, reload, sup), name="runtime-reloader"),
                    tg.create_task(_pinger(sup, state.stop), name="runtime-pinger"),
                ]
                ours.extend(helpers)

                def done(_: asyncio.Task[Any]) -> None:
                    for h in helpers:
                        h.cancel()

                service.add_done_callback(done)
        except Exception as group:
            # The service failed: raise its own error, not the group wrapping it, so the CLI
            # prints one message (with its fix).
            inner = getattr(group, "exceptions", None)
            if inner and len(inner) == 1:
                raise inner[0] from None
            raise
        finally:
            _supervisor.reset(token)
            if not state.stop.is_set():  # it ended by itself (--seconds, an error)
                sup.notifier.stopping()
    if outcome:
        raise outcome[-1]
    return service.result()


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]], *, name: str,
        drain_seconds: float | None = None,
        reload: Callable[[], Awaitable[None]] | None = None, ready: Ready = "start") -> T:
    """Run ``main(stop)`` in a new event loop until it returns; see the module docstring."""
    return asyncio.run(serve(main, name=name, drain_seconds=drain_seconds, reload=reload,
                             ready=ready))


__all__ = ["CANCEL_GRACE_S", "DRAIN_SECONDS", "FORCED_EXIT_CODE", "Health", "Supervisor",
           "capture_signals", "in_flight", "run", "serve", "sleep", "supervisor"]
