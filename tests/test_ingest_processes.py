"""`edgekeeper cloud serve --workers 2` as an operator runs it: a real parent process owning two
real ingest processes on one port (SO_REUSEPORT), over a real Redis queue and PostgreSQL store.

Nothing of ours is patched: which process answered is read from /healthz (its pid, in a
header), the
children are found as the parent's children in /proc, and the events are read back from Redis.
The waits are rendezvous with a deadline (a loaded machine starts Python slowly); nothing is
timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgekeeper.cli import main
from edgekeeper.cloud.backends import open_queue
from edgekeeper.cloud.ingest import PROCESS_HEADER
from edgekeeper.config import CloudSection
from edgekeeper.protocol import envelope as E
from edgekeeper.protocol.keys import CloudPublicKeys, DeviceKeys, b64e

from cloudkit import make_event
from servers import RedisServer, free_port

STARTUP_S = 120.0  # Python starting three times on a busy 2-core machine


def request(url: str, data: bytes | None = None, content_type: str = "") -> tuple[int, Any]:
    """One request on a new connection (so the kernel picks a child for each)."""
    return request_with_headers(url, data, content_type)[:2]


def request_with_headers(url: str, data: bytes | None = None, content_type: str = ""
                         ) -> tuple[int, Any, Any]:
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def metrics(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
        return str(resp.read().decode())


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one series in the text format (0 when absent)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(p) for p in text.split()}


def wait_for(check: Any, what: str, timeout: float = STARTUP_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


class Parent:
    """`cloud serve --workers N` running in a session of its own (killed whole at the end)."""

    def __init__(self, config: Path, port: int, workers: int = 2) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgekeeper.cli", "--config", str(config), "cloud",
             "serve", "--port", str(port), "--workers", str(workers)],
            env={**os.environ, "EDGEKEEPER_LOG_FORMAT": "json"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        self.stderr = b""

    def healthy_pid(self) -> int | None:
        assert self.proc.poll() is None, self.proc.communicate()
        try:
            status, _, headers = request_with_headers(f"{self.base}/healthz")
        except (urllib.error.URLError, ConnectionError):
            return None
        return int(headers[PROCESS_HEADER]) if status == 200 else None

    def children(self) -> set[int]:
        return children(self.proc.pid)

    def serving(self, expected: set[int]) -> bool:
        """True once every one of ``expected`` has answered /healthz (new connections)."""
        seen: set[int] = set()
        for _ in range(200):
            pid = self.healthy_pid()
            if pid is not None:
                seen.add(pid)
            if seen >= expected:
                return True
        return False

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        _, self.stderr = self.proc.communicate(timeout=60)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


@pytest.fixture
def cloud_config(tmp_path: Path, redis_server: RedisServer, redis_prefix: str,
                 postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file on the Redis queue and the PostgreSQL store (a fresh prefix and database)."""
    path = tmp_path / "cloud.toml"
    path.write_text(
        "[cloud]\n"
        f'data_dir = "{tmp_path / "cloud"}"\n'
        'queue_backend = "redis"\nstore_backend = "postgres"\n'
        f'redis_url = "{redis_server.url}"\nredis_prefix = "{redis_prefix}"\n'
        f'postgres_dsn = "{postgres_dsn}"\n'
        "registry_refresh_seconds = 0.1\nrate_per_second = 1000\nrate_burst = 1000\n"
    )
    for name in ("EDGEKEEPER_CLOUD_DATA_DIR", "EDGEKEEPER_QUEUE_BACKEND",
                 "EDGEKEEPER_STORE_BACKEND", "EDGEKEEPER_REDIS_URL", "EDGEKEEPER_POSTGRES_DSN",
                 "EDGEKEEPER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGEKEEPER_STATE_DIR", str(tmp_path / "state"))
    return path


@pytest.fixture
def parent(cloud_config: Path) -> Iterator[Parent]:
    running = Parent(cloud_config, free_port())
    try:
        yield running
    finally:
        running.kill()


def enroll(base: str, config: Path, device_id: str,
           capsys: pytest.CaptureFixture[str]) -> tuple[DeviceKeys, CloudPublicKeys]:
    assert main(["--config", str(config), "cloud", "token"]) == 0
    token = capsys.readouterr().out.strip()
    keys = DeviceKeys.generate()
    status, body = request(f"{base}/v1/enroll", json.dumps(
        {"token": token, "device_id": device_id, "sign_pk": b64e(keys.sign_pk),
         "box_pk": b64e(keys.box_pk)}).encode(), "application/json")
    assert status == 201, body
    return keys, CloudPublicKeys.from_json(body["cloud"])


def queued_keys(config: Path) -> list[tuple[str, int]]:
    """Every event in the Redis queue, as (device, seq), read by leasing them all."""
    from edgekeeper.config import load

    section: CloudSection = load(config).cloud

    async def read() -> list[tuple[str, int]]:
        queue = await open_queue("redis", Path("."), section=section)
        try:
            leases = await queue.lease("test", count=1000, visibility_s=600)
            return [(lease.event.device_id, lease.event.seq) for lease in leases]
        finally:
            await queue.close()

    return asyncio.run(read())


def test_two_processes_serve_one_port_exactly_once_restart_and_drain(
    parent: Parent, capsys: pytest.CaptureFixture[str]
) -> None:
    first = wait_for(lambda: parent.healthy_pid() and len(parent.children()) == 2 and
                     parent.children(), "two children listening")
    # Both children answer on the one port (the kernel spreads new connections over them).
    assert wait_for(lambda: parent.serving(first), "both children answering")
    assert parent.proc.pid not in first

    keys, cloud = enroll(parent.base, parent.config, "pi-scale", capsys)
    n = 30
    for seq in range(1, n + 1):
        env = E.seal_event(make_event("pi-scale", seq, frame_bytes=500), device=keys,
                           cloud_box_pk=cloud.box_pk, sent_at=time.time(), model_version="m@1")
        assert request(f"{parent.base}/v1/events", env, E.CONTENT_TYPE) == (
            202, {"status": "queued", "device_id": "pi-scale", "seq": seq})
        # The device retrying (its answer lost): whichever child gets it, a duplicate.
        assert request(f"{parent.base}/v1/events", env, E.CONTENT_TYPE)[0] == 200
    # /metrics on the shared port adds every child's counts up, whichever child answers.
    for _ in range(4):
        text = metrics(parent.base)
        assert sample(text, "edgekeeper_ingest_events_total", 'status="queued"') == n
        assert sample(text, "edgekeeper_ingest_events_total", 'status="duplicate"') == n

    # A child killed outright is started again; the port keeps answering meanwhile.
    victim = sorted(first)[0]
    os.kill(victim, signal.SIGKILL)
    second = wait_for(lambda: (c := parent.children()) and len(c) == 2 and victim not in c
                      and c, "the killed child replaced")
    assert second & first == first - {victim}
    assert wait_for(lambda: parent.serving(second), "the new child answering")
    env = E.seal_event(make_event("pi-scale", n + 1, frame_bytes=500), device=keys,
                       cloud_box_pk=cloud.box_pk, sent_at=time.time(), model_version="m@1")
    assert request(f"{parent.base}/v1/events", env, E.CONTENT_TYPE)[0] == 202
    # The dead child's counts stay in the totals (its live gauges are dropped).
    text = metrics(parent.base)
    assert sample(text, "edgekeeper_ingest_events_total", 'status="queued"') == n + 1

    # SIGHUP reaches every child (each re-reads the device registry).
    parent.proc.send_signal(signal.SIGHUP)

    # SIGTERM: both children drain, the parent exits 0 and leaves no child behind.
    assert parent.stop() == 0, parent.stderr.decode()[-3000:]
    assert not any(Path(f"/proc/{pid}").exists() and
                   "zombie" not in Path(f"/proc/{pid}/status").read_text()
                   for pid in second)
    lines = [json.loads(line) for line in parent.stderr.decode().splitlines()
             if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert events.count("processes.child_drained") == 2, events
    assert "processes.child_died" in events
    # (a SIGTERM right behind the SIGHUP may reach a child before its reload is done)
    assert events.count("processes.reload_sent") == 2, events
    assert b"Traceback" not in parent.stderr
    assert b"Traceback" not in parent.stderr

    # Every event arrived exactly once.
    got = queued_keys(parent.config)
    assert sorted(got) == [("pi-scale", seq) for seq in range(1, n + 2)]


def test_refusals_are_one_clear_line(cloud_config: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--config", str(cloud_config), "cloud", "serve", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 2 and "--workers 0" in err and "fix:" in err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--config", str(cloud_config), "cloud", "serve", "--workers", "2",
                     "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot listen" in err and "Traceback" not in err


def test_the_cloud_unit_lets_the_parent_own_its_children() -> None:
    """systemd signals the main process only (it forwards SIGTERM and SIGHUP itself) and kills
    whatever is left after the stop timeout; the option is reachable from the unit."""
    root = Path(__file__).resolve().parent.parent
    unit = {}
    for line in (root / "systemd" / "edgekeeper-cloud.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            unit[key] = value
    assert unit["KillMode"] == "mixed" and unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(unit["TimeoutStopSec"]) > 20  # the runtime's drain deadline is 20 s
    from edgekeeper.config import load

    assert load(None, env={"EDGEKEEPER_INGEST_PROCESSES": "4"}).cloud.ingest_processes == 4


def test_sqlite_backends_take_two_processes_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """N > 1 is allowed on the embedded backends (docs/scaling.md says why it is safe): an
    event and its retries, spread over both children, are queued once."""
    config = tmp_path / "cloud.toml"
    config.write_text(f'[cloud]\ndata_dir = "{tmp_path / "cloud"}"\n'
                      "registry_refresh_seconds = 0.1\nrate_per_second = 1000\n"
                      "rate_burst = 1000\n")
    for name in ("EDGEKEEPER_CLOUD_DATA_DIR", "EDGEKEEPER_QUEUE_BACKEND",
                 "EDGEKEEPER_STORE_BACKEND", "EDGEKEEPER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGEKEEPER_STATE_DIR", str(tmp_path / "state"))
    running = Parent(config, free_port())
    try:
        pids = wait_for(lambda: running.healthy_pid() and len(running.children()) == 2 and
                        running.children(), "two children listening")
        assert wait_for(lambda: running.serving(pids), "both children answering")
        keys, cloud = enroll(running.base, config, "pi-lite", capsys)
        statuses = []
        for seq in range(1, 11):
            env = E.seal_event(make_event("pi-lite", seq, frame_bytes=500), device=keys,
                               cloud_box_pk=cloud.box_pk, sent_at=time.time(),
                               model_version="m@1")
            statuses += [request(f"{running.base}/v1/events", env, E.CONTENT_TYPE)[0]
                         for _ in range(3)]
        assert statuses == [202, 200, 200] * 10
        assert running.stop() == 0, running.stderr.decode()[-3000:]
    finally:
        running.kill()
    assert main(["--config", str(config), "cloud", "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ready"], doc["dedupe_keys"]) == (10, 10)


def test_a_child_dying_is_restarted_and_a_stuck_one_killed_at_the_deadline(
        tmp_path: Path) -> None:
    """edgekeeper/processes.py on plain commands: restarts counted, a failed drain reported,
    a child that ignores SIGTERM killed when the parent's drain is cancelled."""
    from edgekeeper.processes import Child, ChildrenFailed, ProcessGroup

    py = sys.executable
    ready = tmp_path / "ready"
    dies = Child("dies", (py, "-c", "raise SystemExit(3)"))
    # Each says it is ready (a file) once its SIGTERM handler is in place.
    exits_badly = Child("bad", (py, "-c", "import signal, sys, time\n"
                                "signal.signal(signal.SIGTERM, lambda *a: sys.exit(4))\n"
                                f"open({str(ready)!r} + '.bad', 'w').close(); time.sleep(60)"))
    stuck = Child("stuck", (py, "-c", "import signal, time\n"
                            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                            f"open({str(ready)!r} + '.stuck', 'w').close(); time.sleep(60)"))
    exited: list[int] = []

    async def until_exists(path: Path) -> None:
        while not await asyncio.to_thread(path.exists):  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[int, BaseException | None, bool]:
        group = ProcessGroup([dies, exits_badly], on_exit=exited.append,
                             restart_base_s=0.0, restart_cap_s=0.0)
        stop = asyncio.Event()
        task = asyncio.create_task(group.run(stop))
        while group.restarts < 3:  # noqa: ASYNC110 - the state lives in the child processes
            await asyncio.sleep(0.05)
        await until_exists(Path(f"{ready}.bad"))
        stop.set()
        error: BaseException | None = None
        try:
            await task
        except ChildrenFailed as err:
            error = err
        # A child ignoring SIGTERM: the parent's deadline cancels the group, which kills it.
        group2 = ProcessGroup([stuck])
        stop2 = asyncio.Event()
        task2 = asyncio.create_task(group2.run(stop2))
        await until_exists(Path(f"{ready}.stuck"))
        stop2.set()
        await asyncio.sleep(0.5)
        task2.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task2
        proc = group2.procs["stuck"]
        await proc.wait()
        return group.restarts, error, proc.returncode == -signal.SIGKILL

    restarts, error, killed = asyncio.run(scenario())
    assert restarts >= 3 and len(exited) >= 4
    assert isinstance(error, ChildrenFailed) and "bad" in str(error) and "exit 4" in str(error)
    assert "dies" not in str(error)  # restarting, or killed by the SIGTERM while starting
    assert killed
