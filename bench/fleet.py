"""Fleet simulator: many devices running the real device code against a real cloud on 127.0.0.1.

    python bench/fleet.py --mode embedded --devices 100 --every 2 --duration 300 --out DIR
    python bench/fleet.py --mode embedded --devices 100 --find-max --out DIR
    python bench/fleet.py --mode redis --devices 100 --duration 600 --faults --cut 60 --out DIR

Each simulated device has its own keys (enrolled over HTTP with a one-time token, as
``edgekeeper device enroll`` does), its own SQLite outbox (device/outbox.py), uploader
(device/uplink.py), and results client and ledger (device/results.py); they share this one
process and its event loop. Events come from the recording models/samples/street run once
through the device's own pipeline (device/replay.py: the real sources, TFLite gates, trigger and
capture) at start; every capture then takes the next of those events, renumbered with the
device's own sequence number and stamped with the device's own clock, and hands it to the
device's ``OutboxSink`` (running the gate models for 100 devices on a shared 2-core machine
would measure the gate, not the fleet).

The cloud is the real commands in their own processes: ``edgekeeper cloud serve`` and
``edgekeeper cloud worker`` with the anthropic reasoner, which talks to the fake Messages API
(tests/fake_anthropic.py, its own process) answering after ``--llm-ms``.

* ``--mode embedded``: SQLite queue and store (the defaults), one ingest, ``--workers`` workers.
* ``--mode redis``: a redis-server (appendonly, appendfsync always, as the queue requires) and a
  PostgreSQL cluster of our own on free ports (tests/servers.py starts them), two ingest
  processes (devices split between them) and two workers. ``--faults`` runs a schedule of
  faults during the capture phase: an ingest SIGKILLed and restarted, a worker SIGKILLed with
  events leased, Redis SIGKILLed and restarted from its files, PostgreSQL stopped with
  ``-m immediate`` (a crash) and started, the network between some devices and their ingest
  blackholed for ``--cut`` seconds (tests/tcp_proxy.py). Always in that mode: one device's clock
  is ``--skew`` seconds behind, and one device (behind the cut) has a tiny outbox quota with
  ``full_policy = "reject_new"``, so its outbox runs full during the cut.

After the capture phase the simulator waits (``--drain`` s at most) until every captured event
has its result on its device, then reconciles: an event is *captured* when the outbox committed
it; it is *lost* when no result reached its device, *duplicated* when two results (two cloud
result ids) reached its device for the same event. Events the device could not store (its
outbox full) are *refused at capture* and reported by the device (outbox counters, logged), as
documented in docs/storage.md; they are listed, not counted as captured. The report
(``fleet.json`` and ``fleet.png`` in ``--out``) asserts lost = 0 and duplicated = 0 and the
command exits 1 when not.

``--find-max`` (embedded mode): the capture rate steps up (``--step`` s per step) until the
queue grows without bound or the latency runs away; the highest rate that held is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from edgekeeper import compat, log  # noqa: E402
from edgekeeper import config as config_mod  # noqa: E402
from edgekeeper.cloud.backends import open_queue, open_store  # noqa: E402
from edgekeeper.cloud.enroll import issue_token  # noqa: E402
from edgekeeper.cloud.keys import CloudKeys  # noqa: E402
from edgekeeper.config import CloudSection  # noqa: E402
from edgekeeper.device import identity  # noqa: E402
from edgekeeper.device.events import Event  # noqa: E402
from edgekeeper.device.outbox import AsyncOutbox, Outbox, OutboxSink  # noqa: E402
from edgekeeper.device.results import ResultActions, ResultsClient  # noqa: E402
from edgekeeper.device.uplink import Uplink  # noqa: E402
from edgekeeper.protocol.messages import ResultBody  # noqa: E402

import servers  # noqa: E402 - the tests' harness starts redis-server / PostgreSQL
from tcp_proxy import TcpProxy  # noqa: E402

API_KEY = "fake-key-fleet-simulator"

# Put on the cloud processes' PYTHONPATH as sitecustomize.py: SIGUSR1 writes every asyncio task's
# stack to the process's log. A stalled drain (events queued, nobody asking the provider, no
# result for a while) is reported with what each worker was waiting on, not just that it waited.
TASK_DUMP = """
import asyncio, signal, sys

def _dump(signum, frame):
    loop = asyncio._get_running_loop()
    tasks = asyncio.all_tasks(loop) if loop is not None else set()
    print(f"fleet.task_dump: {len(tasks)} tasks", file=sys.stderr)
    for task in tasks:
        print(f"--- {task.get_name()}", file=sys.stderr)
        task.print_stack(limit=20, file=sys.stderr)
    sys.stderr.flush()

signal.signal(signal.SIGUSR1, _dump)
"""
SAMPLE = config_mod.MODELS_DIR / "samples" / "street"


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetOptions:
    mode: str = "embedded"  # embedded | redis
    devices: int = 100
    every_s: float = 2.0  # one event per device every ...
    duration_s: float = 300.0  # capture phase
    llm_ms: float = 500.0
    workers: int = 1
    ingests: int = 1
    worker_concurrency: int = 32
    drain_s: float = 240.0
    faults: bool = False
    cut_s: float = 60.0
    cut_share: float = 0.1  # of the devices behind the proxy that is cut
    skew_s: float = -600.0
    find_max: bool = False
    step_s: float = 60.0
    latency_limit_s: float = 20.0
    visibility_s: float = 10.0
    recording: Path = SAMPLE
    out: Path = Path("fleet-report")

    @property
    def redis(self) -> bool:
        return self.mode == "redis"


# --- processes we start ----------------------------------------------------------------------


class Proc:
    """One cloud command in its own process, its output appended to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logfile: Path) -> None:
        self.name, self.argv, self.env, self.logfile = name, argv, env, logfile
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.stuck_on_stop = False
        self.held = False  # a fault owns its restart: the supervisor keeps off

    async def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                env={**os.environ, **self.env})
        self.starts += 1

    async def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or drained."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with compat.timeout(30):
                await self.proc.wait()
        except TimeoutError:
            print(f"{self.name} did not stop within 30 s of SIGTERM: killed", file=sys.stderr)
            self.stuck_on_stop = True
            await self.kill()

    def kill_now(self) -> None:
        """From a ``finally`` that may run after the event loop is gone (Ctrl-C)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def restart_postgres(pg: servers.PostgresServer, down_s: float) -> None:
    """Crash our own cluster (``pg_ctl stop -m immediate``: no checkpoint, recovery on start)
    and start it again on the same port."""
    assert pg.started and pg.workdir is not None and pg.bindir is not None
    parts = dict(p.split("=", 1) for p in pg.base.split())
    data = str(pg.workdir / "data")
    subprocess.run(servers._as_postgres([str(pg.bindir / "pg_ctl"), "-D", data, "-m",
                                         "immediate", "-w", "stop"]),
                   capture_output=True, check=True, timeout=60)
    time.sleep(down_s)
    opts = (f"-p {parts['port']} -k {pg.workdir} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200")
    subprocess.run(servers._as_postgres([str(pg.bindir / "pg_ctl"), "-D", data, "-o", opts,
                                         "-l", str(pg.workdir / "postgres.log"), "-w", "-t",
                                         "60", "start"]),
                   capture_output=True, check=True, timeout=90)


class CloudRig:
    """The cloud on 127.0.0.1: servers, ingest and worker processes, the fake provider."""

    def __init__(self, opts: FleetOptions, tmp: Path) -> None:
        self.opts, self.tmp = opts, tmp
        self.data_dir = tmp / "cloud"
        self.config = tmp / "cloud.toml"
        self.redis: servers.RedisServer | None = None
        self.pg: servers.PostgresServer | None = None
        self.dsn = ""
        self.fake: Proc | None = None
        self.fake_stats = ""
        self.ingests: list[Proc] = []
        self.ports: list[int] = []
        self.workers: list[Proc] = []
        self.store: Any = None
        self.queue: Any = None

    def section(self) -> dict[str, Any]:
        o = self.opts
        values: dict[str, Any] = {
            "data_dir": str(self.data_dir), "host": "127.0.0.1",
            "reasoner": "anthropic", "worker_concurrency": o.worker_concurrency,
            "queue_visibility_seconds": o.visibility_s,
            # Every device sends far below this; the limit guards the ingest, not the bench.
            "rate_per_second": 50.0, "rate_burst": 200, "max_inflight": 256,
        }
        if o.redis:
            assert self.redis is not None
            values.update({"queue_backend": "redis", "store_backend": "postgres",
                           "redis_url": self.redis.url, "redis_prefix": "fleet",
                           "postgres_dsn": self.dsn})
        return values

    def write_config(self) -> None:
        body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in self.section().items())
        # transcriber none: no speech-to-text in the worker (pocketsphinx would measure the
        # CPU, not the fleet); the audio still goes to the reasoner as the event carries it.
        self.config.write_text(f"""[log]
level = "info"
format = "json"

[cloud]
{body}

[reasoner]
max_retries = 2
timeout_seconds = 60
transcriber = "none"

[budget]
device_daily_usd = 0
global_daily_usd = 0
""")

    async def start_provider(self) -> str:
        """tests/fleet_provider.py (the fake Messages API, keeping no bodies) in its own
        process; its URL once it listens."""
        url_file = self.tmp / "provider.json"
        self.fake = Proc("provider", [sys.executable, str(ROOT / "tests" / "fleet_provider.py"),
                                      "--latency", str(self.opts.llm_ms / 1000.0),
                                      "--url-file", str(url_file)],
                         {}, self.tmp / "provider.log")
        await self.fake.start()
        for _ in range(1200):
            if url_file.exists():
                info = json.loads(url_file.read_text())
                self.fake_stats = info["stats"]
                return str(info["url"])
            if not self.fake.alive:
                break
            await asyncio.sleep(0.1)
        tail = (self.tmp / "provider.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"the fake provider did not start:\n{tail}")

    async def provider(self, session: aiohttp.ClientSession) -> dict[str, int] | None:
        try:
            async with compat.timeout(3), session.get(f"{self.fake_stats}/stats") as resp:
                return dict(await resp.json())
        except Exception:
            return None

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "edgekeeper.cli", "--config", str(self.config), *args]

    async def start(self) -> None:
        o = self.opts
        if o.redis:
            self.redis = await asyncio.to_thread(servers.start_redis)
            self.pg = await asyncio.to_thread(servers.start_postgres)
            name = await asyncio.to_thread(self.pg.create_database)
            self.dsn = self.pg.url(name)
        fake_url = await self.start_provider()
        self.write_config()
        await asyncio.to_thread(CloudKeys.ensure, self.data_dir)  # before the processes race
        section = CloudSection(**{k: v for k, v in self.section().items()})
        self.store = await open_store(section.store_backend, self.data_dir, section=section)
        self.queue = await open_queue(section.queue_backend, self.data_dir, section=section,
                                      max_attempts=section.queue_max_attempts)
        dump = self.tmp / "taskdump"
        dump.mkdir()
        (dump / "sitecustomize.py").write_text(TASK_DUMP)
        path = os.pathsep.join(p for p in (str(dump), os.environ.get("PYTHONPATH", "")) if p)
        env = {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": fake_url,
               "PYTHONPATH": path}
        for i in range(o.ingests):
            port = servers.free_port()
            self.ports.append(port)
            self.ingests.append(Proc(f"ingest{i}", self.cli("cloud", "serve", "--port",
                                                            str(port)),
                                     env, self.tmp / f"ingest{i}.log"))
        for i in range(o.workers):
            self.workers.append(Proc(f"worker{i}", self.cli("cloud", "worker"), env,
                                     self.tmp / f"worker{i}.log"))
        for p in [*self.ingests, *self.workers]:
            await p.start()
        for i in range(o.ingests):
            await self.wait_ingest(i)

    def kill_now(self) -> None:
        """Whatever is still running, killed without the event loop (the last resort)."""
        for p in [*self.ingests, *self.workers]:
            p.kill_now()
        if self.fake is not None:
            self.fake.kill_now()
        for server in (self.redis, self.pg):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        self.redis = self.pg = None

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    async def wait_ingest(self, i: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.ingests[i].alive:
                    tail = self.ingests[i].logfile.read_text(errors="replace")[-2000:]
                    raise SystemExit(f"ingest{i} exited:\n{tail}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{self.url(i)}/healthz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise SystemExit(f"ingest{i} did not answer /healthz within {timeout:.0f} s")

    async def depth(self) -> tuple[int, int] | None:
        """(ready + leased, dead), or None while the queue cannot be asked (Redis down)."""
        try:
            async with compat.timeout(3):
                s = await self.queue.stats()
        except Exception:
            return None
        return s.ready + s.leased, s.dead

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in [*self.ingests, *self.workers]))
        for closer in (self.queue, self.store):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.close()
        if self.fake is not None:
            await self.fake.stop()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
        if self.pg is not None:
            await asyncio.to_thread(self.pg.stop)
        self.redis = self.pg = None


# --- devices ---------------------------------------------------------------------------------


class ObservedActions(ResultActions):
    """The device's real result handling (ledger first, then ack), observed: every result the
    cloud hands over is noted with its result id, so the report can tell a redelivery of the
    same result (a lost ack: harmless) from a second result for the same event (a duplicate)."""

    def __init__(self, *args: Any, on_result: Callable[[ResultBody, int | None, str], None],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_result = on_result

    async def handle(self, key: str, result: ResultBody, *, result_id: int | None = None
                     ) -> Any:
        outcome = await super().handle(key, result, result_id=result_id)
        self.on_result(result, result_id, str(outcome))
        return outcome


@dataclass
class SimDevice:
    index: int
    device_id: str
    state_dir: Path
    skew_s: float = 0.0
    quota_bytes: int = 512 * 1024 * 1024
    full_policy: str = "evict_lowest_priority"
    ingest: int = 0
    behind_proxy: bool = False
    captured: dict[int, float] = field(default_factory=dict)  # seq -> captured_at (own clock)
    refused: list[int] = field(default_factory=list)  # not stored: outbox full / disk full
    result_ids: dict[int, set[int]] = field(default_factory=dict)
    result_at: dict[int, float] = field(default_factory=dict)  # own clock
    outbox: AsyncOutbox | None = None
    sink: OutboxSink | None = None
    uplink: Uplink | None = None
    actions: ObservedActions | None = None
    results: ResultsClient | None = None

    def clock(self) -> float:
        return time.time() + self.skew_s

    def note_result(self, result: ResultBody, result_id: int | None, outcome: str) -> None:
        if result_id is not None:
            self.result_ids.setdefault(result.seq, set()).add(result_id)
        self.result_at.setdefault(result.seq, self.clock())

    def open(self, upload_url: str, enrollment: identity.Enrollment) -> None:
        """What DeviceLink.from_config builds, with this device's clock (a board whose clock
        is off runs the same code with a wrong time.time())."""
        cfg = config_mod.build_from_dict({
            "device": {"id": self.device_id, "state_dir": str(self.state_dir)},
            # A fleet operator's settings: notice a dead link in seconds, not the defaults'
            # half minute, and come back within 10 s of the cloud returning.
            "uplink": {"connect_timeout_seconds": 5.0, "read_timeout_seconds": 15.0,
                       "backoff_base_seconds": 0.5, "backoff_cap_seconds": 10.0},
            "results": {"jsonl": "", "poll_wait_seconds": 20.0},
        }, source=f"fleet device {self.device_id}")
        keys = identity.load_keys(self.state_dir)
        self.outbox = AsyncOutbox(Outbox(cfg.outbox_path, device_id=self.device_id,
                                         quota_bytes=self.quota_bytes,
                                         full_policy=self.full_policy,  # type: ignore[arg-type]
                                         clock=self.clock))
        self.sink = OutboxSink(self.outbox)
        self.actions = ObservedActions(self.state_dir / "results.sqlite", clock=self.clock,
                                       on_result=self.note_result)
        self.uplink = Uplink(self.outbox, keys=keys, device_id=self.device_id,
                             cloud_url=upload_url, cloud_box_pk=enrollment.cloud.box_pk,
                             section=cfg.uplink, clock=self.clock)
        self.results = ResultsClient(self.actions, keys=keys, device_id=self.device_id,
                                     cloud_url=upload_url, cloud_box_pk=enrollment.cloud.box_pk,
                                     section=cfg.results,
                                     connect_timeout=cfg.uplink.connect_timeout_seconds,
                                     clock=self.clock)

    async def run(self, stop: asyncio.Event) -> None:
        assert self.uplink is not None and self.results is not None
        async with self.uplink, self.results, compat.TaskGroup() as tg:
            tg.create_task(self.uplink.run(stop))
            tg.create_task(self.results.run(stop))

    async def close(self) -> None:
        if self.actions is not None:
            await self.actions.close()
        if self.outbox is not None:
            await self.outbox.close()

    async def capture(self, template: Event) -> None:
        """One capture through the device's sink: a sequence number, then the commit."""
        assert self.sink is not None and self.outbox is not None
        seq = await self.sink.next_seq()
        if seq is None:  # the disk had no room even for the counter
            self.refused.append(-1)
            return
        event = dataclasses.replace(template, device_id=self.device_id, seq=seq,
                                    captured_at=self.clock())
        before = (await self.outbox.stats()).dropped_total, self.sink.lost
        await self.sink.deliver(event)
        after = (await self.outbox.stats()).dropped_total, self.sink.lost
        if after != before:
            self.refused.append(seq)
        else:
            self.captured[seq] = event.captured_at


class Collect:
    """A sink that keeps the events the pipeline builds (the replay's output)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.n = 0

    async def next_seq(self) -> int | None:
        self.n += 1
        return self.n

    async def deliver(self, event: Event) -> None:
        self.events.append(event)

    async def aclose(self) -> None:
        return None


async def build_events(recording: Path, tmp: Path) -> list[Event]:
    """The recording through the device pipeline, once: the events every capture replays."""
    from edgekeeper.device.replay import replay_recording

    cfg = config_mod.build_from_dict(
        {"device": {"id": "fleet-template", "state_dir": str(tmp / "template")},
         "microphone": {"enabled": True}}, source="fleet template")
    sink = Collect()
    await replay_recording(recording, cfg, events_dir=tmp / "template-events", progress=False,
                           sink=sink)
    if not sink.events:
        raise SystemExit(f"{recording}: the pipeline built no event from this recording; "
                         "pass one in which the gate fires (models/samples/street does)")
    return sink.events


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Timeline:
    t0: float
    entries: list[dict[str, Any]] = field(default_factory=list)

    def start(self, name: str, **detail: Any) -> dict[str, Any]:
        entry = {"fault": name, "start_s": round(time.time() - self.t0, 2), "end_s": None,
                 **detail}
        self.entries.append(entry)
        print(f"[{entry['start_s']:7.1f}s] {name} {detail or ''}", flush=True)
        return entry

    def end(self, entry: dict[str, Any], **detail: Any) -> None:
        entry["end_s"] = round(time.time() - self.t0, 2)
        entry.update(detail)


class Fleet:
    def __init__(self, opts: FleetOptions, tmp: Path) -> None:
        self.opts, self.tmp = opts, tmp
        self.cloud = CloudRig(opts, tmp)
        self.devices: list[SimDevice] = []
        self.proxy: TcpProxy | None = None
        self.templates: list[Event] = []
        self.interval = opts.every_s
        self.rate_changed = asyncio.Event()
        self.capturing = True
        self.t0 = time.time()
        self.timeline = Timeline(self.t0)
        self.series: list[dict[str, Any]] = []
        self.phases: list[dict[str, Any]] = []
        self.stuck_devices: list[str] = []
        self.stalls: list[dict[str, Any]] = []

    # -- setup ----------------------------------------------------------------------------

    async def setup(self) -> None:
        o = self.opts
        print(f"building events from {o.recording.name} through the device pipeline", flush=True)
        self.templates = await build_events(o.recording, self.tmp)
        print(f"{len(self.templates)} events; starting the cloud ({o.mode})", flush=True)
        await self.cloud.start()
        if o.redis:
            # The proxy sits in front of ingest 0: the devices behind it lose the network.
            self.proxy = TcpProxy("127.0.0.1", self.cloud.ports[0])
            await self.proxy.__aenter__()
        cut = max(2, round(o.devices * o.cut_share)) if o.redis else 0
        async with aiohttp.ClientSession() as session:
            for i in range(o.devices):
                dev = SimDevice(i, f"fleet-{i:03d}", self.tmp / "devices" / f"fleet-{i:03d}",
                                ingest=i % o.ingests)
                if o.redis and i < cut:
                    dev.ingest, dev.behind_proxy = 0, True
                if o.redis and i == cut:  # outside the cut: its skew is the only fault it has
                    dev.skew_s = o.skew_s
                if o.redis and i == 0:
                    # Room for one event, not two: full from the second capture behind the cut.
                    size = max(len(e.to_body().encode()) for e in self.templates)
                    dev.quota_bytes, dev.full_policy = int(size * 1.4), "reject_new"
                token = await issue_token(self.cloud.store, ttl_s=600, now=time.time())
                enrollment = await identity.enroll(self.cloud.url(dev.ingest), token,
                                                   device_id=dev.device_id,
                                                   state_dir=dev.state_dir, session=session)
                await asyncio.to_thread(identity.save_enrollment, dev.state_dir, enrollment)
                url = (f"http://127.0.0.1:{self.proxy.port}" if dev.behind_proxy and self.proxy
                       else self.cloud.url(dev.ingest))
                await asyncio.to_thread(dev.open, url, enrollment)
                self.devices.append(dev)
        print(f"{o.devices} devices enrolled", flush=True)

    # -- capture, sampling, faults ----------------------------------------------------------

    async def capture_loop(self, dev: SimDevice, until: float) -> None:
        loop = asyncio.get_running_loop()
        # Spread the devices over one interval, so the ingest sees a steady stream.
        await asyncio.sleep(self.interval * dev.index / max(1, len(self.devices)))
        k = dev.index
        while self.capturing and time.time() < until:
            last = loop.time()
            await dev.capture(self.templates[k % len(self.templates)])
            k += 1
            # Until the next capture is due; a rate step (--find-max) wakes every device to
            # recompute it, so the new rate holds from the step on, not one old interval later.
            while (wait := min(last + self.interval - loop.time(), until - time.time())) > 0:
                with contextlib.suppress(TimeoutError):
                    async with compat.timeout(wait):
                        await self.rate_changed.wait()

    def totals(self) -> dict[str, int]:
        captured = sum(len(d.captured) for d in self.devices)
        delivered = sum(d.uplink.stats.delivered + d.uplink.stats.duplicates
                        for d in self.devices if d.uplink is not None)
        results = sum(len(d.result_at) for d in self.devices)
        return {"captured": captured, "delivered": delivered, "results": results,
                "refused": sum(len(d.refused) for d in self.devices)}

    async def sampler(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                depth = await self.cloud.depth()
                provider = await self.cloud.provider(session) or {}
                self.series.append({"t": round(time.time() - self.t0, 2),
                                    "queue": None if depth is None else depth[0],
                                    "dead": None if depth is None else depth[1],
                                    "interval_s": self.interval, **self.totals(),
                                    "llm_requests": provider.get("requests"),
                                    "llm_in_flight": provider.get("in_flight")})
                with contextlib.suppress(TimeoutError):
                    async with compat.timeout(1.0):
                        await stop.wait()

    async def supervise(self, stop: asyncio.Event) -> None:
        """What systemd does for the cloud units (Restart=always, RestartSec=2): a process
        that exits on its own is started again. Each such exit is in the timeline, with the
        last line it wrote, since the process left on its own and that is worth knowing."""
        procs = [*self.cloud.ingests, *self.cloud.workers]
        while not stop.is_set():
            for p in procs:
                if p.held or p.alive or p.proc is None:
                    continue
                lines = p.logfile.read_text(errors="replace").strip().splitlines()
                e = self.timeline.start("process_exited", process=p.name,
                                        code=p.proc.returncode,
                                        last_line=(lines[-1] if lines else "")[:300])
                await asyncio.sleep(2.0)
                await p.start()
                self.timeline.end(e, restarted=True)
            with contextlib.suppress(TimeoutError):
                async with compat.timeout(0.5):
                    await stop.wait()

    async def faults(self, start: float, length: float) -> None:
        """The fault schedule, spread over the capture phase (each one recovers before the
        next starts, so each shows on its own in the timeline)."""
        o, cloud, tl = self.opts, self.cloud, self.timeline
        slots = [start + length * f for f in (0.08, 0.22, 0.36, 0.50, 0.62)]

        async def at(t: float) -> None:
            await asyncio.sleep(max(0.0, t - time.time()))

        await at(slots[0])
        e = tl.start("ingest_sigkill", process="ingest1" if o.ingests > 1 else "ingest0")
        victim = cloud.ingests[o.ingests - 1]
        victim.held = True
        await victim.kill()
        await asyncio.sleep(2.0)
        await victim.start()
        victim.held = False
        await cloud.wait_ingest(o.ingests - 1)
        tl.end(e)

        await at(slots[1])
        depth = await cloud.depth()
        e = tl.start("worker_sigkill", process="worker0",
                     queued_or_leased_at_kill=None if depth is None else depth[0])
        cloud.workers[0].held = True
        await cloud.workers[0].kill()
        await asyncio.sleep(2.0)
        await cloud.workers[0].start()
        cloud.workers[0].held = False
        tl.end(e)

        await at(slots[2])
        assert cloud.redis is not None
        e = tl.start("redis_restart", how="SIGKILL, restarted from its AOF after 3 s")
        await asyncio.to_thread(cloud.redis.kill)
        await asyncio.sleep(3.0)
        await asyncio.to_thread(cloud.redis.launch)
        tl.end(e)

        await at(slots[3])
        assert cloud.pg is not None
        e = tl.start("postgres_restart", how="pg_ctl stop -m immediate, start after 3 s")
        await asyncio.to_thread(restart_postgres, cloud.pg, 3.0)
        tl.end(e)

        await at(slots[4])
        assert self.proxy is not None
        cut = [d.device_id for d in self.devices if d.behind_proxy]
        e = tl.start("network_cut", devices=cut, seconds=o.cut_s, mode="blackhole")
        self.proxy.mode = "blackhole"
        await asyncio.sleep(o.cut_s)
        self.proxy.mode = "pass"
        tl.end(e)

    async def steps(self, start: float) -> None:
        """--find-max: raise the rate each step until a step does not hold."""
        o = self.opts
        interval = o.every_s
        while True:
            self.interval = interval
            self.rate_changed.set()  # wakes every waiting device; later waits block again
            self.rate_changed.clear()
            began = time.time()
            await asyncio.sleep(o.step_s)
            phase = self.judge_phase(began - self.t0, time.time() - self.t0)
            self.phases.append(phase)
            print(f"step {phase['offered_per_s']:.1f} ev/s offered: "
                  f"{'holds' if phase['sustained'] else 'does not hold'} ({phase})", flush=True)
            if not phase["sustained"]:
                self.capturing = False
                return
            interval /= 1.5

    def judge_phase(self, a: float, b: float) -> dict[str, Any]:
        o = self.opts
        rows = [r for r in self.series if a <= r["t"] <= b]
        offered = len(self.devices) / self.interval
        out: dict[str, Any] = {"start_s": round(a, 1), "end_s": round(b, 1),
                               "offered_per_s": round(offered, 2)}
        if len(rows) < 4:
            return {**out, "sustained": False, "why": "too short"}
        span = rows[-1]["t"] - rows[0]["t"]
        out["captured_per_s"] = round((rows[-1]["captured"] - rows[0]["captured"]) / span, 2)
        out["ingested_per_s"] = round((rows[-1]["delivered"] - rows[0]["delivered"]) / span, 2)
        out["reasoned_per_s"] = round((rows[-1]["results"] - rows[0]["results"]) / span, 2)
        half = [r for r in rows[len(rows) // 2:] if r["queue"] is not None]
        slope = 0.0
        if len(half) >= 3:
            slope = float(np.polyfit([r["t"] for r in half], [r["queue"] for r in half], 1)[0])
        out["queue_growth_per_s"] = round(slope, 3)
        lat = self.latencies(a, b)
        out.update(latency_stats(lat))
        growing = slope > 0.05 * offered
        slow = bool(lat) and out["p99_s"] > o.latency_limit_s
        behind = out["ingested_per_s"] < 0.9 * out["captured_per_s"]
        out["sustained"] = not (growing or slow or behind)
        out["why"] = ", ".join(w for w, bad in (("queue grows", growing),
                                                 ("latency runs away", slow),
                                                 ("ingest falls behind", behind)) if bad)
        return out

    def latencies(self, a: float = 0.0, b: float = float("inf")) -> list[float]:
        """Capture -> result on the device (its own clock at both ends), for events captured
        between a and b seconds into the run."""
        out = []
        for d in self.devices:
            for seq, cap in d.captured.items():
                rel = cap - d.skew_s - self.t0
                if a <= rel <= b and seq in d.result_at:
                    out.append(d.result_at[seq] - cap)
        return out

    async def run(self) -> dict[str, Any]:
        o = self.opts
        await self.setup()
        stop_devices, stop_sampler = asyncio.Event(), asyncio.Event()
        devices = [asyncio.create_task(d.run(stop_devices), name=d.device_id)
                   for d in self.devices]
        async with compat.TaskGroup() as tg:
            tg.create_task(self.sampler(stop_sampler))
            tg.create_task(self.supervise(stop_sampler))
            start = time.time()
            self.t0 = self.timeline.t0 = start
            until = start + (10 * 86400 if o.find_max else o.duration_s)
            captures = [tg.create_task(self.capture_loop(d, until)) for d in self.devices]
            if o.faults and o.redis:
                tg.create_task(self.faults(start, o.duration_s))
            if o.find_max:
                await self.steps(start)
            await asyncio.gather(*captures)
            capture_end = time.time() - self.t0
            print(f"capture phase over at {capture_end:.0f} s: {self.totals()}", flush=True)
            drain_start = time.time()
            progress = (time.time(), self.totals()["results"])
            while time.time() - drain_start < o.drain_s and not self.all_answered():
                await asyncio.sleep(1.0)
                now, results = time.time(), self.totals()["results"]
                if results != progress[1]:
                    progress = (now, results)
                elif now - progress[0] > 30 and not self.stalls:
                    self.stall()
                if int(time.time() - drain_start) % 10 == 0:
                    last = self.series[-1] if self.series else {}
                    print(f"draining {time.time() - drain_start:.0f} s: {self.totals()} queue "
                          f"{last.get('queue')} provider asked {last.get('llm_requests')}, "
                          f"{last.get('llm_in_flight')} in flight", flush=True)
            drain_s = time.time() - drain_start
            # Two more seconds: a duplicate result would arrive after the last first one.
            await asyncio.sleep(2.0)
            stop_sampler.set()
        stop_devices.set()
        await self.stop_devices(devices)
        return await self.report(capture_end, drain_s)

    def stall(self) -> None:
        """No result for 30 s with events still unanswered: ask every worker what it waits on
        (SIGUSR1: the task dump in its log) and say so in the report."""
        last = self.series[-1] if self.series else {}
        entry: dict[str, Any] = {"t": round(time.time() - self.t0, 1), "queue": last.get("queue"),
                                 "llm_in_flight": last.get("llm_in_flight"), "dumped": []}
        for p in self.cloud.workers:
            if p.alive and p.proc is not None:
                os.kill(p.proc.pid, signal.SIGUSR1)
                entry["dumped"].append(f"logs/{p.logfile.name}")
        self.stalls.append(entry)
        print(f"stalled: {entry}", flush=True)

    async def stop_devices(self, tasks: list[asyncio.Task[None]]) -> None:
        """Each device's uploader and results client stop on ``stop``; one that has not after
        a minute is shown (its stack) and cancelled, so a hang is reported, not waited on."""
        done, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            print(f"device {task.get_name()} did not stop within 60 s of being asked:",
                  file=sys.stderr, flush=True)
            task.print_stack(file=sys.stderr)
            task.cancel()
        for task in [*done, *pending]:
            with contextlib.suppress(asyncio.CancelledError):
                err = await task if task in pending else task.exception()
                if isinstance(err, BaseException):
                    print(f"device {task.get_name()} failed: {err!r}", file=sys.stderr)
        self.stuck_devices = [t.get_name() for t in pending]

    def all_answered(self) -> bool:
        return all(seq in d.result_at for d in self.devices for seq in d.captured)

    # -- the report -------------------------------------------------------------------------

    async def report(self, capture_end: float, drain_s: float) -> dict[str, Any]:
        o = self.opts
        lost: dict[str, list[int]] = {}
        dup: dict[str, list[int]] = {}
        extra: dict[str, list[int]] = {}
        for d in self.devices:
            missing = sorted(set(d.captured) - set(d.result_at))
            twice = sorted(s for s, ids in d.result_ids.items() if len(ids) > 1)
            unknown = sorted(set(d.result_at) - set(d.captured))
            if missing:
                lost[d.device_id] = missing
            if twice:
                dup[d.device_id] = twice
            if unknown:
                extra[d.device_id] = unknown
        depth = await self.cloud.depth()
        tot = self.totals()
        lat = self.latencies()
        steady = [r for r in self.series if 0 <= r["t"] <= capture_end]
        span = (steady[-1]["t"] - steady[0]["t"]) if len(steady) > 1 else 1.0
        skewed = [d for d in self.devices if d.skew_s]
        tight = [d for d in self.devices if d.full_policy == "reject_new"]
        report: dict[str, Any] = {
            "bench": "fleet",
            "date": time.strftime("%Y-%m-%d"),
            "options": {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in dataclasses.asdict(o).items()},
            "events_per_capture_template": len(self.templates),
            "capture_seconds": round(capture_end, 1),
            "drain_seconds": round(drain_s, 1),
            **tot,
            "duplicates_in_uplink": sum(d.uplink.stats.duplicates for d in self.devices
                                        if d.uplink is not None),
            "lost": sum(len(v) for v in lost.values()),
            "duplicated": sum(len(v) for v in dup.values()),
            "results_for_unknown_events": sum(len(v) for v in extra.values()),
            "lost_by_device": lost,
            "duplicated_by_device": dup,
            "refused_at_capture": {d.device_id: len(d.refused) for d in self.devices
                                   if d.refused},
            "dead_letters": None if depth is None else depth[1],
            "queue_at_end": None if depth is None else depth[0],
            "ingested_per_s": round(tot["delivered"] / max(span, 1e-9), 2),
            "reasoned_per_s": round(
                (steady[-1]["results"] - steady[0]["results"]) / max(span, 1e-9), 2)
            if len(steady) > 1 else 0.0,
            **latency_stats(lat),
            "timeline": self.timeline.entries,
            "phases": self.phases,
            "skewed_devices": [
                {"device": d.device_id, "skew_s": d.skew_s, "captured": len(d.captured),
                 "results": len(d.result_at),
                 "uplink_clock_offset_learnt_s": round(d.uplink.clock_offset, 1)
                 if d.uplink else None,
                 "results_clock_offset_learnt_s": round(d.results.clock_offset, 1)
                 if d.results else None}
                for d in skewed],
            "full_outbox_devices": [
                {"device": d.device_id, "quota_bytes": d.quota_bytes,
                 "captured": len(d.captured), "results": len(d.result_at),
                 "refused_at_capture": len(d.refused)} for d in tight],
            "devices_that_did_not_stop": self.stuck_devices,
            "stalls": self.stalls,
            "processes_alive_at_end": {p.name: p.alive for p in
                                       [*self.cloud.ingests, *self.cloud.workers]},
            "processes": {p.name: p.starts for p in [*self.cloud.ingests, *self.cloud.workers]},
            "series": self.series,
        }
        if o.find_max:
            held = [p for p in self.phases if p["sustained"]]
            report["highest_sustained"] = held[-1] if held else None
        report["ok"] = (report["lost"] == 0 and report["duplicated"] == 0
                        and report["results_for_unknown_events"] == 0)
        return report


def latency_stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"p50_s": None, "p99_s": None, "max_s": None}
    return {"p50_s": round(float(np.percentile(values, 50)), 3),
            "p99_s": round(float(np.percentile(values, 99)), 3),
            "max_s": round(float(max(values)), 3)}


def plot(report: dict[str, Any], path: Path) -> None:
    """Queue depth, captures and results over time, faults shaded: fleet.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["series"]
    t = [r["t"] for r in s]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    ax1.plot(t, [np.nan if r["queue"] is None else r["queue"] for r in s], label="queue depth")
    ax1.plot(t, [r["captured"] - r["delivered"] for r in s], label="device outboxes (pending)")
    ax1.set_ylabel("events")
    ax1.legend(loc="upper left")
    rate = [0.0] + [(b["results"] - a["results"]) / max(1e-9, b["t"] - a["t"])
                    for a, b in itertools.pairwise(s)]
    cap = [0.0] + [(b["captured"] - a["captured"]) / max(1e-9, b["t"] - a["t"])
                   for a, b in itertools.pairwise(s)]
    ax2.plot(t, cap, label="captured / s", alpha=0.7)
    ax2.plot(t, rate, label="results on devices / s", alpha=0.7)
    ax2.set_ylabel("events / s")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper left")
    colours = plt.get_cmap("tab10")
    for i, e in enumerate(report["timeline"]):
        end = e["end_s"] if e["end_s"] is not None else e["start_s"] + 1
        for ax in (ax1, ax2):
            ax.axvspan(e["start_s"], max(end, e["start_s"] + 1), color=colours(i + 2),
                       alpha=0.25, label=e["fault"] if ax is ax1 else None)
    ax1.legend(loc="upper left", fontsize=8)
    verdict = "OK" if report["ok"] else "FAILED"
    ax1.set_title(f"fleet: {report['options']['devices']} devices, {report['options']['mode']}"
                  f" - captured {report['captured']}, results {report['results']}, lost "
                  f"{report['lost']}, duplicated {report['duplicated']} ({verdict})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv: list[str] | None) -> FleetOptions:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["embedded", "redis"], default="embedded")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--every", type=float, default=2.0, help="seconds between a device's events")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of capture")
    p.add_argument("--llm-ms", type=float, default=500.0, help="the fake provider's answer time")
    p.add_argument("--workers", type=int, help="worker processes (default 1, redis mode 2)")
    p.add_argument("--ingests", type=int, help="ingest processes (default 1, redis mode 2)")
    p.add_argument("--concurrency", type=int, default=32, help="events in flight per worker")
    p.add_argument("--drain", type=float, default=240.0,
                   help="seconds to wait after the capture phase for the last results")
    p.add_argument("--faults", action="store_true", help="redis mode: the fault schedule")
    p.add_argument("--cut", type=float, default=60.0, help="seconds of the network cut")
    p.add_argument("--skew", type=float, default=-600.0, help="the skewed device's clock error")
    p.add_argument("--find-max", action="store_true",
                   help="step the rate up until it no longer holds (embedded mode)")
    p.add_argument("--step", type=float, default=60.0, help="seconds per --find-max step")
    p.add_argument("--latency-limit", type=float, default=20.0,
                   help="--find-max: a p99 latency above this (s) does not hold")
    p.add_argument("--recording", type=Path, default=SAMPLE)
    p.add_argument("--out", type=Path, default=Path("fleet-report"))
    a = p.parse_args(argv)
    redis = a.mode == "redis"
    for name in ("devices", "every", "duration", "llm_ms", "concurrency", "drain", "step"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if a.faults and not redis:
        p.error("--faults needs --mode redis (the faults restart Redis and PostgreSQL)")
    if a.faults and a.cut * 1.0 > a.duration * 0.35:
        p.error(f"--cut {a.cut:g} does not fit in --duration {a.duration:g}: the cut starts at "
                "62% of the capture phase; make --duration at least 3 times --cut")
    return FleetOptions(
        mode=a.mode, devices=a.devices, every_s=a.every, duration_s=a.duration, llm_ms=a.llm_ms,
        workers=a.workers or (2 if redis else 1), ingests=a.ingests or (2 if redis else 1),
        worker_concurrency=a.concurrency, drain_s=a.drain, faults=a.faults, cut_s=a.cut,
        skew_s=a.skew, find_max=a.find_max, step_s=a.step, latency_limit_s=a.latency_limit,
        recording=a.recording, out=a.out)


async def amain(opts: FleetOptions) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ek-fleet-"))
    fleet = Fleet(opts, tmp)
    try:
        return await fleet.run()
    finally:
        for d in fleet.devices:
            with contextlib.suppress(Exception):
                await d.close()
        if fleet.proxy is not None:
            await fleet.proxy.close()
        try:
            await fleet.cloud.stop()
        finally:
            fleet.cloud.kill_now()
        logs = opts.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for f in tmp.glob("*.log"):
            shutil.copy2(f, logs / f.name)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    # The devices' own log lines (retries during the faults) go to a file, not the terminal.
    with (opts.out / "devices.log").open("w") as stream:
        log.configure(level="warning", fmt="json", stream=stream)
        report = asyncio.run(amain(opts))
    (opts.out / "fleet.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, opts.out / "fleet.png")
    brief = {k: v for k, v in report.items()
             if k not in ("series", "options", "lost_by_device", "duplicated_by_device")}
    print(json.dumps(brief, indent=2))
    if not report["ok"]:
        print(f"FLEET FAILED: lost {report['lost']}, duplicated {report['duplicated']}, "
              f"results for unknown events {report['results_for_unknown_events']} "
              f"(see {opts.out / 'fleet.json'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
