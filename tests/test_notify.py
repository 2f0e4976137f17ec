"""systemd supervision of `edgekeeper run`, as systemd meets it: a real device process started
with NOTIFY_SOCKET pointing at a datagram socket this test owns (in the abstract namespace, as
systemd's own is) and WATCHDOG_USEC set. The camera is an MJPEG server on 127.0.0.1 (the
bundled street recording, with people in it) that the test can make stall, as a network camera
does. Nothing of ours is patched: the process reads its environment as under systemd.

READY=1 comes once frames flow; WATCHDOG=1 comes every half period while they do and stops when
the camera stalls (the service says why in STATUS=), then comes back; SIGTERM gives STOPPING=1
and exit 0. SIGHUP re-reads the config file: a valid one changes the trigger at once, a bad one
is refused in one log line naming the file and key, and the service keeps running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgekeeper.notify import Notifier

from cloudkit import until
from devicekit import WAIT, Proc, device, device_toml, mjpeg_camera

pytestmark = pytest.mark.slow  # CI runs it on the main Python only (.ci/run)

WATCHDOG_USEC = 2_000_000  # WatchdogSec=2: a ping every second, "stalled" after 2 s


# --- the supervisor's socket ----------------------------------------------------------------


@dataclass
class NotifySocket:
    """A datagram socket where a service's sd_notify messages arrive, as systemd's does."""

    sock: socket.socket
    address: str
    messages: list[list[str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [line for m in self.messages for line in m]

    def count(self, line: str) -> int:
        return sum(line in m for m in self.messages)

    def statuses(self) -> list[str]:
        return [line[len("STATUS="):] for line in self.lines() if line.startswith("STATUS=")]

    async def until(self, what: Callable[[], bool], label: str, proc: Proc | None = None
                    ) -> None:
        async def check() -> bool:
            if proc is not None:
                assert proc.proc.returncode is None, f"{label}: exited\n" + proc.text()
            return what()

        try:
            await until(check, WAIT)
        except AssertionError:
            raise
        except Exception as err:  # until's timeout: say what was seen
            raise AssertionError(f"{label}: not seen; got {self.messages[-10:]}") from err


@contextlib.asynccontextmanager
async def notify_socket() -> AsyncIterator[NotifySocket]:
    name = f"edgekeeper-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    ns = NotifySocket(sock, "@" + name)
    loop = asyncio.get_running_loop()

    async def read() -> None:
        while True:
            data = await loop.sock_recv(sock, 65536)
            ns.messages.append(data.decode().split("\n"))

    reader = asyncio.create_task(read())
    try:
        yield ns
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        sock.close()


def assert_one_json_object_per_line(lines: list[str]) -> None:
    for line in lines:
        assert "XNNPACK" not in line or line.startswith("{"), line
        doc = json.loads(line)  # raises on a raw native line
        assert isinstance(doc, dict) and "event" in doc, line
    assert not any("Created TensorFlow Lite XNNPACK" in line for line in lines)


# --- the tests ------------------------------------------------------------------------------


async def test_watchdog_pings_only_while_frames_flow_and_sigterm_says_stopping(
    tmp_path: Path, sample_recording: Path
) -> None:
    async with notify_socket() as ns, mjpeg_camera(sample_recording) as cam:
        env = {"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        async with device(device_toml(tmp_path, cam.url), env=env) as p:
            await ns.until(lambda: ns.count("READY=1") >= 1, "READY=1", p)
            # Ready means frames flow: the first READY=1 comes after the camera opened.
            ready = next(i for i, m in enumerate(ns.messages) if "READY=1" in m)
            assert not any("WATCHDOG=1" in m for m in ns.messages[:ready])
            await ns.until(lambda: ns.count("WATCHDOG=1") >= 3, "three WATCHDOG=1", p)
            assert any("frames/s" in s for s in ns.statuses()), ns.statuses()

            cam.flowing.clear()  # the camera stalls: no frame, connection open
            await ns.until(lambda: any("no camera frame" in s for s in ns.statuses()),
                           "STATUS saying the camera stalled", p)
            pings, beats = ns.count("WATCHDOG=1"), len(ns.messages)
            # Three more rounds of the runtime's pinger (each sends STATUS=), no ping in them.
            await ns.until(lambda: len(ns.messages) >= beats + 3, "three more rounds", p)
            assert ns.count("WATCHDOG=1") == pings, ns.messages[beats - 1:]
            unhealthy = p.events("runtime.unhealthy")
            assert unhealthy and "no camera frame" in str(unhealthy[0]["why"])

            cam.flowing.set()  # frames again: pings again
            await ns.until(lambda: ns.count("WATCHDOG=1") > pings, "WATCHDOG=1 again", p)
            await p.logged("runtime.healthy")

            p.proc.send_signal(signal.SIGTERM)
            assert await p.exited() == 0, p.text()
    assert any("STOPPING=1" in m for m in ns.messages), ns.messages[-5:]
    assert not p.events("runtime.drain_timeout")
    # Every stderr line is one JSON object; TFLite's XNNPACK notice is not among them raw.
    assert_one_json_object_per_line(p.lines)
    (stopped,) = p.events("device.stopped")
    assert int(str(stopped["frames"])) > 0


def _small_files_only() -> None:
    """In the child, before exec: no file may grow past 16 KB (a disk with room for the status
    file and sequence numbers, not for an event's JPEGs). SIGXFSZ ignored (survives exec), so an
    oversized write fails with EFBIG as a full disk's fails with ENOSPC, instead of killing."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))


async def test_watchdog_stops_when_events_cannot_be_stored(
    tmp_path: Path, sample_recording: Path
) -> None:
    async with notify_socket() as ns, mjpeg_camera(sample_recording) as cam:
        env = {"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        async with device(device_toml(tmp_path, cam.url), env=env,
                          preexec_fn=_small_files_only) as p:
            await ns.until(lambda: ns.count("READY=1") >= 1, "READY=1", p)
            await p.logged("sink.event_not_stored")  # the person event's JPEGs did not fit
            await ns.until(lambda: any("could not be stored" in s for s in ns.statuses()),
                           "STATUS saying events cannot be stored", p)
            pings, beats = ns.count("WATCHDOG=1"), len(ns.messages)
            await ns.until(lambda: len(ns.messages) >= beats + 3, "three more rounds", p)
            # Frames still flow (the camera is fine): only the sink keeps the pings off.
            assert ns.count("WATCHDOG=1") == pings, ns.messages[beats - 1:]
            assert not any("no camera frame" in s for s in ns.statuses())
            p.proc.send_signal(signal.SIGTERM)
            assert await p.exited() == 0, p.text()
    assert not list((tmp_path / "state" / "events").glob("0*"))  # nothing half-written kept


async def test_sighup_applies_trigger_rules_and_refuses_a_bad_file(
    tmp_path: Path, sample_recording: Path
) -> None:
    async with notify_socket() as ns, mjpeg_camera(sample_recording) as cam:
        # The street recording shows people, but the person rule is switched off: no trigger.
        off = "[trigger.labels.person]\nenabled = false\n"
        cfg = device_toml(tmp_path, cam.url, off)
        async with device(cfg, env={"NOTIFY_SOCKET": ns.address}) as p:
            await ns.until(lambda: ns.count("READY=1") >= 1, "READY=1", p)
            await p.logged("device.running")

            # A bad value: refused in one line naming the file and the key; still running.
            cfg.write_text(cfg.read_text().replace(
                "enabled = false", "enabled = true\nthreshold = 2.0"))
            p.proc.send_signal(signal.SIGHUP)
            failed = await p.logged("runtime.reload_failed")
            assert str(cfg) in str(failed["error"]), failed
            assert "trigger.labels.person" in str(failed["error"]), failed
            assert failed["fix"], failed
            assert not p.events("trigger.fired")
            assert any("RELOADING=1" in m for m in ns.messages)

            # A good file: the rule applies at once, and the camera change waits for a restart.
            cfg.write_text(cfg.read_text().replace("threshold = 2.0", "threshold = 0.5")
                           .replace("fps = 10", "fps = 5"))
            p.proc.send_signal(signal.SIGHUP)
            reloaded = await p.logged("device.config_reloaded")
            assert reloaded["applied"] == ["trigger"], reloaded
            assert reloaded["needs_restart"] == ["camera"], reloaded
            fired = await p.logged("trigger.fired")
            assert fired["label"] == "person"
            p.proc.send_signal(signal.SIGTERM)
            assert await p.exited() == 0, p.text()
    assert len(p.events("runtime.reload_failed")) == 1


def test_notifier_speaks_the_protocol_to_a_path_and_is_silent_without_a_socket(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    try:
        n = Notifier.from_env(env)
        assert env == {}  # taken out: a child process never reports in our name
        # WATCHDOG_PID names another process: no watchdog for us.
        assert n.enabled and n.watchdog_interval is None
        assert n.ready("up") and n.stopping()
        assert server.recv(100) == b"READY=1\nSTATUS=up"
        assert server.recv(100) == b"STOPPING=1"
        n.close()
        n = Notifier.from_env({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000"})
        assert n.watchdog_interval == pytest.approx(15.0)
        path.unlink()  # the supervisor went away: a lost message, no exception
        assert not n.watchdog("x") and n.failed == 1
        n.close()
    finally:
        server.close()
    silent = Notifier.from_env({})
    assert not silent.enabled and not silent.ready() and silent.watchdog_interval is None


def test_native_writes_to_fd_2_become_json_log_lines(capfd: pytest.CaptureFixture[str]) -> None:
    """What C code prints to fd 2 during a model load is logged, one JSON object per line;
    a JSON line (ours, from another thread meanwhile) goes through unchanged."""
    from edgekeeper import log

    log.configure("debug", "json")
    try:
        with log.native_output("tflite"):
            os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
            os.write(2, b'{"event": "gate.loaded", "level": "info"}\n')
            os.write(2, b"ERROR: something the runtime refused\n")
    finally:
        log.configure("warning", "json")
    lines = capfd.readouterr().err.splitlines()
    docs = [json.loads(line) for line in lines]  # every line parses
    assert {"event": "gate.loaded", "level": "info"} in docs
    native = {d["line"]: d["level"] for d in docs if d["event"] == "native.output"}
    assert native == {"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.": "debug",
                      "ERROR: something the runtime refused": "warning"}


# A bug that blocks the event loop, injected at the process boundary: Python runs a signal
# handler in the main thread, the thread the loop runs on, so while this handler sleeps the
# loop runs nothing at all (no task, no timer), as when a library call stalls it. Nothing of
# ours is patched; the child picks the file up through PYTHONPATH like any sitecustomize.
_BLOCKER = '''\
import os, signal, time
signal.signal(signal.SIGUSR2, lambda *_: time.sleep(float(os.environ["BLOCK_SECONDS"])))
'''


async def test_watchdog_stops_while_the_event_loop_is_blocked(
    tmp_path: Path, sample_recording: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER)
    block_s = 5.0
    async with notify_socket() as ns, mjpeg_camera(sample_recording) as cam:
        env = {"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": str(WATCHDOG_USEC),
               "BLOCK_SECONDS": str(block_s),
               "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
        async with device(device_toml(tmp_path, cam.url), env=env) as p:
            await ns.until(lambda: ns.count("WATCHDOG=1") >= 3, "three WATCHDOG=1", p)
            pings = ns.count("WATCHDOG=1")
            p.proc.send_signal(signal.SIGUSR2)  # the loop is blocked for block_s seconds
            await asyncio.sleep(block_s - 1.0)
            # Healthy, the pinger sends one every second (WatchdogSec=2): four here. Blocked,
            # none (one may have been on its way as the signal landed). systemd would now
            # restart the service: WatchdogSec passed without a ping.
            assert ns.count("WATCHDOG=1") - pings <= 1, ns.messages[-6:]
            await ns.until(lambda: ns.count("WATCHDOG=1") > pings + 1,
                           "WATCHDOG=1 once the loop runs again", p)
            p.proc.send_signal(signal.SIGTERM)
            assert await p.exited() == 0, p.text()
