"""Worker scaling on the shared backends: two worker processes against one, on Redis + PostgreSQL.

    python bench/bench_workers_redis.py [--concurrency 32] [--latency 1.0] [--rounds 2]
                                        [--warmup 3] [--window 8]

The provider is the fake Messages API (tests/fake_anthropic.py) in its own process, answering
every call after ``--latency`` seconds; the workers are the real ``edgekeeper cloud worker``
command (the real anthropic SDK, Redis Streams queue, PostgreSQL store), each with
``--concurrency`` events in flight, so one worker is bounded by the provider's latency
(about concurrency / latency events/s), not by the queue. Redis and PostgreSQL are found or
started as the tests do (tests/servers.py), with a fresh key prefix and database.

Each round runs both setups in turn (interleaved, so background load hits both alike): the
queue is filled with new sealed events from 8 enrolled devices, the worker process(es) start,
and once results flow (after ``--warmup`` s) the results stored during ``--window`` s are
counted. Prints one JSON object: events/s for one and for two workers (median over rounds),
the ratio two/one (the goal: >= 1.8), and one worker's share of its latency-bound ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from edgekeeper import log  # noqa: E402
from edgekeeper.cloud.backends import open_queue, open_store  # noqa: E402
from edgekeeper.cloud.enroll import EnrollRequest, enroll, issue_token  # noqa: E402
from edgekeeper.cloud.keys import CloudKeys  # noqa: E402
from edgekeeper.cloud.queue.base import QueuedEvent  # noqa: E402
from edgekeeper.protocol.envelope import peek_header, seal_event  # noqa: E402
from edgekeeper.protocol.keys import DeviceKeys, b64e  # noqa: E402
from edgekeeper.protocol.messages import EventBody  # noqa: E402

import servers  # noqa: E402 - the tests' harness for real Redis / PostgreSQL

DEVICES = 8
API_KEY = "fake-key-bench-workers"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def jpeg(seed: int) -> bytes:
    import cv2
    import numpy as np

    img = np.random.default_rng(seed).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return bytes(buf)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, redis_url: str, prefix: str,
                 dsn: str, fake_url: str) -> None:
        self.args, self.tmp = args, tmp
        self.redis_url, self.prefix, self.dsn, self.fake_url = redis_url, prefix, dsn, fake_url
        self.data_dir = tmp / "cloud"
        self.config = tmp / "cloud.toml"
        self.devices: list[tuple[str, DeviceKeys]] = []
        self.next_seq = 1
        self.frame = jpeg(1)
        self.fake_pid = 0
        # CPU milliseconds per stored result, per setup and round.
        self.cpu_ms: dict[int, list[dict[str, float]]] = {1: [], 2: []}

    def write_config(self) -> None:
        a = self.args
        self.config.write_text(f"""
[log]
level = "warning"
format = "json"

[cloud]
data_dir = "{self.data_dir}"
queue_backend = "redis"
store_backend = "postgres"
redis_url = "{self.redis_url}"
redis_prefix = "{self.prefix}"
postgres_dsn = "{self.dsn}"
reasoner = "anthropic"
worker_concurrency = {a.concurrency}
queue_visibility_seconds = 120

[reasoner]
max_retries = 0
timeout_seconds = 60

[budget]
device_daily_usd = 0
global_daily_usd = 0
""")

    async def setup(self) -> None:
        self.write_config()
        self.keys = await asyncio.to_thread(CloudKeys.ensure, self.data_dir)
        self.store = await open_store("postgres", self.data_dir, dsn=self.dsn)
        self.queue = await open_queue("redis", self.data_dir, url=self.redis_url,
                                      prefix=self.prefix)
        for i in range(DEVICES):
            keys = DeviceKeys.generate()
            token = await issue_token(self.store, ttl_s=600, now=time.time())
            req = EnrollRequest.from_json({"token": token, "device_id": f"bench-{i}",
                                           "sign_pk": b64e(keys.sign_pk),
                                           "box_pk": b64e(keys.box_pk)})
            await enroll(self.store, req, now=time.time())
            self.devices.append((f"bench-{i}", keys))

    async def fill(self, n: int) -> None:
        """Enqueue ``n`` new sealed events, round-robin over the devices."""
        async def one(k: int) -> None:
            device_id, keys = self.devices[k % DEVICES]
            seq = self.next_seq + k
            body = EventBody(device_id=device_id, seq=seq, captured_at=time.time(),
                             meta={"label": "person", "scores": {"person": 0.9}},
                             frames=(self.frame,), audio_wav=None)
            env = seal_event(body, device=keys, cloud_box_pk=self.keys.box_pk,
                             sent_at=time.time(), model_version="person@1.0.0")
            header = peek_header(env, max_bytes=len(env))
            await self.queue.enqueue(QueuedEvent(device_id, seq, header.payload_hash, env,
                                                 time.time()))

        await asyncio.gather(*(one(k) for k in range(n)))
        self.next_seq += n

    async def results(self) -> int:
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cur = await conn.execute("SELECT count(*) FROM results")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    async def measure(self, workers: int) -> float:
        a = self.args
        ceiling = a.concurrency / a.latency
        await self.fill(int(ceiling * workers * (a.warmup + a.window + 20) * 1.2))
        env = {**os.environ, "ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": self.fake_url}
        logs = [self.tmp / f"worker-{workers}-{i}.log" for i in range(workers)]
        procs = []
        for path in logs:
            with path.open("wb") as err:
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "edgekeeper.cli", "--config", str(self.config),
                    "cloud", "worker", stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                    env=env))
        try:
            # Results flowing from every worker (each logs nothing at warning level, so watch
            # the count), then warm up, then count over the window.
            start = await self.results()
            deadline = time.monotonic() + 120
            while await self.results() < start + workers * a.concurrency:
                if time.monotonic() > deadline or any(p.returncode is not None for p in procs):
                    raise RuntimeError("workers did not start: " + " | ".join(
                        path.read_text(errors="replace")[-800:] for path in logs))
                await asyncio.sleep(0.1)
            await asyncio.sleep(a.warmup)
            pids = [p.pid for p in procs] + [self.fake_pid]
            cpu0 = [cpu_seconds(pid) for pid in pids]
            c0, t0 = await self.results(), time.monotonic()
            await asyncio.sleep(a.window)
            c1, t1 = await self.results(), time.monotonic()
            cpu1 = [cpu_seconds(pid) for pid in pids]
            done = max(1, c1 - c0)
            self.cpu_ms[workers].append({
                "workers": round(1000 * sum(cpu1[i] - cpu0[i] for i in range(workers)) / done, 2),
                "fake_provider": round(1000 * (cpu1[-1] - cpu0[-1]) / done, 2),
            })
            stats = await self.queue.stats()
            if stats.ready == 0:
                raise RuntimeError("the queue ran dry during the window: raise the fill")
            return (c1 - c0) / (t1 - t0)
        finally:
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                await p.wait()
            # Drop what is left so the next setup starts from an empty queue.
            leftover = await self.queue.lease("bench-drain", count=100_000, visibility_s=60)
            for le in leftover:
                await self.queue.ack(le)

    async def close(self) -> None:
        await self.queue.close()
        await self.store.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    redis = servers.find_or_start_redis()
    pg = servers.find_or_start_postgres()
    fake = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "tests" / "fake_anthropic.py"), "--latency", str(args.latency),
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        line = (await fake.stdout.readline()).decode() if fake.stdout else ""
        if not line.startswith("url="):
            raise RuntimeError(f"the fake provider did not start: {line!r}")
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp, \
                servers.fresh_prefix(redis) as prefix, servers.fresh_database(pg) as dsn:
            bench = Bench(args, Path(tmp), redis.url, prefix, dsn, line.strip()[4:])
            bench.fake_pid = fake.pid
            await bench.setup()
            one: list[float] = []
            two: list[float] = []
            try:
                for _ in range(args.rounds):
                    one.append(await bench.measure(1))
                    two.append(await bench.measure(2))
            finally:
                await bench.close()
            cpu_ms = bench.cpu_ms
    finally:
        fake.send_signal(signal.SIGTERM)
        await fake.wait()
        redis.stop()
        pg.stop()
    r1, r2 = statistics.median(one), statistics.median(two)
    return {
        "bench": "workers_redis",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "concurrency_per_worker": args.concurrency,
        "provider_latency_s": args.latency,
        "one_worker_events_per_s": round(r1, 1),
        "two_workers_events_per_s": round(r2, 1),
        "ratio_two_over_one": round(r2 / r1, 2),
        "one_worker_share_of_ceiling": round(r1 / (args.concurrency / args.latency), 2),
        "rounds": {"one": [round(x, 1) for x in one], "two": [round(x, 1) for x in two]},
        "cpu_ms_per_event": {"one": cpu_ms[1], "two": cpu_ms[2]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=32, help="events in flight per worker")
    p.add_argument("--latency", type=float, default=1.0, help="provider answer time, seconds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--window", type=float, default=8.0)
    log.configure("warning", "json")  # stdout is for the result only
    print(json.dumps(asyncio.run(run(p.parse_args())), indent=2))


if __name__ == "__main__":
    main()
