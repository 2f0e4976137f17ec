"""The cloud on "several machines": ingest processes and workers as separate OS processes that
share only a real Redis (the queue) and a real PostgreSQL (the store), each with its own data
directory holding a copy of the cloud's keys, as README "Running the cloud" sets them up.

* any ingest process accepts any device, whichever one enrolled it, and sees a revocation made
  from another box; a replayed envelope is a duplicate whichever process gets it;
* a worker killed with SIGKILL in the middle of an event (the provider asked, no result stored)
  has the event finished by another worker, once: one stored result, the provider asked again;
* a worker that died after storing a result but before its ack costs no second provider call;
* dead letters are listed and requeued through ``edgekeeper cloud dlq``.

The LLM provider is the fake Messages API (tests/fake_anthropic.py) on 127.0.0.1, talked to by
the real anthropic SDK inside the worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgekeeper import compat
from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.enroll import issue_token
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import QueuedEvent
from edgekeeper.cloud.queue.redis_streams import RedisStreamsQueue
from edgekeeper.cloud.store.base import Store
from edgekeeper.protocol.envelope import CONTENT_TYPE, peek_header, seal_result
from edgekeeper.protocol.keys import CloudPublicKeys, DeviceKeys, b64e
from edgekeeper.protocol.messages import ResultBody

from cloudkit import Device, make_event
from fake_anthropic import FakeAnthropic, Reply
from servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

API_KEY = "fake-key-test-distributed-0123456789"


async def until(pred: Callable[[], Awaitable[bool]], timeout: float = 60.0,
                what: str = "condition") -> None:
    """Wait for a condition; the deadline only guards against hanging (nothing is timed)."""
    try:
        async with compat.timeout(timeout):
            while not await pred():  # noqa: ASYNC110 - the state lives in other processes
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for: {what}") from None


@dataclass
class Box:
    """One machine's worth of cloud: a config file and a data directory with the keys."""

    name: str
    config: Path
    data_dir: Path
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "edgekeeper.cli", "--config", str(self.config), *args]

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    async def start(self, *args: str, env: dict[str, str] | None = None
                    ) -> asyncio.subprocess.Process:
        with self.log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *self.cli(*args), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                env={**os.environ, **(env or {})},
            )
        self.procs.append(proc)
        return proc

    async def run(self, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 120.0) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.cli(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
        )
        async with compat.timeout(timeout):
            out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def serve(self) -> str:
        """``edgekeeper cloud serve --port 0``; the URL from its ``ingest.listening`` line."""
        proc = await self.start("cloud", "serve", "--port", "0")

        async def listening() -> bool:
            assert proc.returncode is None, self.log.read_text()[-3000:]
            return "ingest.listening" in self.log.read_text(errors="replace")

        await until(listening, 60, f"{self.name} ingest listening")
        for line in self.log.read_text().splitlines():
            if "ingest.listening" in line:
                return str(json.loads(line)["url"])
        raise AssertionError("unreachable")

    async def stop_all(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                async with compat.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


@dataclass
class Deployment:
    boxes: list[Box]
    redis_url: str
    prefix: str
    postgres_dsn: str
    store: Store
    queue: RedisStreamsQueue
    keys: CloudKeys
    session: aiohttp.ClientSession

    async def enroll(self, url: str, device_id: str, keys: DeviceKeys | None = None) -> Device:
        keys = keys or DeviceKeys.generate()
        token = await issue_token(self.store, ttl_s=600, now=time.time())
        async with self.session.post(
            f"{url}/v1/enroll",
            json={"token": token, "device_id": device_id, "sign_pk": b64e(keys.sign_pk),
                  "box_pk": b64e(keys.box_pk)},
        ) as resp:
            data = await resp.json()
            assert resp.status == 201, data
        return Device(device_id, keys, CloudPublicKeys.from_json(data["cloud"]))

    async def post(self, url: str, envelope: bytes) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"{url}/v1/events", data=envelope,
                                     headers={"Content-Type": CONTENT_TYPE}) as resp:
            return resp.status, await resp.json()

    async def results(self, url: str, device: Device) -> list[dict[str, Any]]:
        query = "cursor=0&wait=0&limit=100"
        headers = device.signed("GET", "/v1/results", query)
        async with self.session.get(f"{url}/v1/results?{query}", headers=headers) as resp:
            data = await resp.json()
            assert resp.status == 200, data
        return list(data["results"])

    async def stored(self, device_id: str) -> list[int]:
        """Seqs of this device's stored results (one entry per stored result)."""
        return [r.seq for r in await self.store.results_after(device_id, 0, 1000)]

    async def queue_empty(self) -> bool:
        stats = await self.queue.stats()
        return stats.ready == 0 and stats.leased == 0


def write_config(path: Path, data_dir: Path, *, redis_url: str, prefix: str, dsn: str,
                 cloud: dict[str, Any] | None = None, extra: str = "") -> None:
    values: dict[str, Any] = {
        "data_dir": str(data_dir), "host": "127.0.0.1", "port": 0,
        "queue_backend": "redis", "store_backend": "postgres",
        "redis_url": redis_url, "redis_prefix": prefix, "postgres_dsn": dsn,
        "registry_refresh_seconds": 0.1, "results_poll_seconds": 0.05,
        "rate_per_second": 1000.0, "rate_burst": 1000,
        "queue_visibility_seconds": 3.0, "queue_max_attempts": 3,
        "reasoner": "echo", "worker_concurrency": 4, **(cloud or {}),
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
    path.write_text(f'[log]\nlevel = "info"\nformat = "json"\n\n[cloud]\n{body}\n{extra}')


@contextlib.asynccontextmanager
async def deployment(tmp_path: Path, redis: RedisServer, prefix: str, dsn: str, *,
                     boxes: int = 2, cloud: dict[str, Any] | None = None, extra: str = ""
                     ) -> AsyncIterator[Deployment]:
    # The keys are made once, on the first box, and copied to the others (README).
    first = tmp_path / "box0" / "data"
    keys = await asyncio.to_thread(CloudKeys.ensure, first)
    made = []
    for i in range(boxes):
        data_dir = tmp_path / f"box{i}" / "data"
        if i:  # README: the box key and the release public key; the signing key stays home
            (data_dir / "keys").mkdir(parents=True, mode=0o700)
            for name in ("cloud-box.key", "release-sign.pub"):
                shutil.copy2(first / "keys" / name, data_dir / "keys" / name)
        config = tmp_path / f"box{i}" / "cloud.toml"
        write_config(config, data_dir, redis_url=redis.url, prefix=prefix, dsn=dsn,
                     cloud=cloud, extra=extra)
        made.append(Box(f"box{i}", config, data_dir))
    store = await open_store("postgres", tmp_path, dsn=dsn, pool_size=4)
    queue = await open_queue("redis", tmp_path, url=redis.url, prefix=prefix,
                             max_attempts=int((cloud or {}).get("queue_max_attempts", 3)))
    assert isinstance(queue, RedisStreamsQueue)
    try:
        async with aiohttp.ClientSession() as session:
            yield Deployment(made, redis.url, prefix, dsn, store, queue, keys, session)
    finally:
        for box in made:
            await box.stop_all()
        await queue.close()
        await store.close()


def anthropic_env(fake: FakeAnthropic) -> dict[str, str]:
    return {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": fake.url}


REASONER_SECTION = """
[reasoner]
max_retries = 0
timeout_seconds = 60
"""


# --- ingest: any process, any device; replays refused everywhere ----------------------------


async def test_any_ingest_accepts_any_device_and_refuses_replays_everywhere(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str, postgres_dsn: str
) -> None:
    async with deployment(tmp_path, redis_server, redis_prefix, postgres_dsn) as d:
        box_a, box_b = d.boxes
        url_a, url_b = await asyncio.gather(box_a.serve(), box_b.serve())
        dev = await d.enroll(url_a, "pi-kitchen")  # enrolled through A ...
        first = dev.seal(make_event(dev.device_id, 1))
        status, body = await d.post(url_b, first)  # ... uploads through B
        assert (status, body["status"]) == (202, "queued"), body
        for url in (url_a, url_b, url_b):  # the same envelope again, anywhere: nothing new
            status, body = await d.post(url, first)
            assert (status, body["status"]) == (200, "duplicate"), body
        # The same seq with another payload: refused by whichever process sees it.
        other = dev.seal(make_event(dev.device_id, 1, label="dog"))
        for url in (url_a, url_b):
            status, body = await d.post(url, other)
            assert status == 409, body
        status, _ = await d.post(url_a, dev.seal(make_event(dev.device_id, 2)))
        assert status == 202
        assert await d.queue.keys() == [("pi-kitchen", 1), ("pi-kitchen", 2)]

        # A worker on a third "box" (B's config) turns them into results; the device fetches
        # them through A.
        code, out, err = await box_b.run("cloud", "worker", "--burst")
        assert code == 0, err[-3000:]
        assert sorted(await d.stored("pi-kitchen")) == [1, 2]
        assert await d.queue_empty()
        assert sorted(r["seq"] for r in await d.results(url_a, dev)) == [1, 2]

        # Revoked from box A's command line: B refuses the device too.
        code, out, err = await box_a.run("cloud", "revoke", "pi-kitchen")
        assert code == 0 and "revoked" in out, err

        seqs = iter(range(3, 10_000))

        async def refused_everywhere() -> bool:
            # Each ingest re-reads the registry every registry_refresh_seconds: an upload in
            # that moment may still be taken, as documented.
            env = dev.seal(make_event(dev.device_id, next(seqs)))
            codes = [(await d.post(url, env))[0] for url in (url_a, url_b)]
            return codes == [401, 401]

        await until(refused_everywhere, 30, "both ingests refuse the revoked device")
        last = dev.seal(make_event(dev.device_id, 10_000))
        assert [(await d.post(url, last))[0] for url in (url_a, url_b)] == [401, 401]
        assert ("pi-kitchen", 10_000) not in await d.queue.keys()
        assert "Traceback" not in box_a.log.read_text() + box_b.log.read_text()


# --- workers: SIGKILL mid-event; crash after store, before ack ------------------------------


async def test_worker_killed_mid_event_is_finished_by_another_exactly_once(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str, postgres_dsn: str
) -> None:
    async with FakeAnthropic(api_key=API_KEY) as fake, deployment(
        tmp_path, redis_server, redis_prefix, postgres_dsn,
        cloud={"reasoner": "anthropic", "queue_visibility_seconds": 2.0,
               "worker_concurrency": 3},
        extra=REASONER_SECTION,
    ) as d:
        box_a, box_b = d.boxes
        url = await box_a.serve()
        dev = await d.enroll(url, "pi-door")
        for seq in (1, 2, 3):
            assert (await d.post(url, dev.seal(make_event(dev.device_id, seq))))[0] == 202
        # The first worker's provider calls hang (a slow provider): it is mid-event on all
        # three when it is killed.
        fake.default = Reply.ok().slow(600)
        first = await box_a.start("cloud", "worker", env=anthropic_env(fake))

        async def asked_three_times() -> bool:
            assert first.returncode is None, box_a.log.read_text()[-3000:]
            return len(fake.requests) >= 3

        await until(asked_three_times, 60, "the first worker asks the provider")
        first.send_signal(signal.SIGKILL)
        await first.wait()
        assert await d.stored("pi-door") == []  # it died before storing anything
        stats = await d.queue.stats()  # its leases are out (or already expired: visibility 2 s)
        assert (stats.ready + stats.leased, stats.dead) == (3, 0)

        # Another worker on another box: after the visibility timeout it takes the events over.
        fake.default = Reply.ok()
        second = await box_b.start("cloud", "worker", env=anthropic_env(fake))

        async def all_stored() -> bool:
            assert second.returncode is None, box_b.log.read_text()[-3000:]
            return len(await d.stored("pi-door")) >= 3 and await d.queue_empty()

        await until(all_stored, 90, "the second worker finishes the events")
        second.send_signal(signal.SIGTERM)
        assert await second.wait() == 0
        assert sorted(await d.stored("pi-door")) == [1, 2, 3]  # one result each
        # The provider was asked again only because the first worker never stored a result:
        # three hung calls, then exactly one answered call per event.
        assert len(fake.answered(200)) == 3 and len(fake.requests) == 6
        assert fake.problems == []
        stats = await d.queue.stats()
        assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)
        results = await d.results(url, dev)
        assert sorted(r["seq"] for r in results) == [1, 2, 3]
        assert API_KEY not in box_a.log.read_text() + box_b.log.read_text()


async def test_result_stored_before_a_crash_is_not_reasoned_again(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str, postgres_dsn: str
) -> None:
    async with FakeAnthropic(api_key=API_KEY) as fake, deployment(
        tmp_path, redis_server, redis_prefix, postgres_dsn, boxes=1,
        cloud={"reasoner": "anthropic"}, extra=REASONER_SECTION,
    ) as d:
        (box,) = d.boxes
        url = await box.serve()
        dev = await d.enroll(url, "pi-yard")
        envelope = dev.seal(make_event(dev.device_id, 7))
        assert (await d.post(url, envelope))[0] == 202
        # A worker leased the event, asked the provider, stored the sealed result, and died
        # before its ack: that is the state in Redis and PostgreSQL now.
        (lease,) = await d.queue.lease("crashed-worker", count=1, visibility_s=0.5)
        assert lease.event.key == "pi-yard:7"
        result = ResultBody(device_id="pi-yard", seq=7, reasoner="anthropic:fake-model",
                            label="person", confidence=0.9, summary="someone at the gate",
                            action="notify", gate_correct=True, provisional=False,
                            produced_at=time.time(), extra={})
        sealed = seal_result(result, cloud_box_sk=d.keys.box_key, device_box_pk=dev.keys.box_pk)
        await d.store.put_result(device_id="pi-yard", seq=7, envelope=sealed, now=time.time())

        worker = await box.start("cloud", "worker", env=anthropic_env(fake))

        async def drained() -> bool:
            assert worker.returncode is None, box.log.read_text()[-3000:]
            return await d.queue_empty()

        await until(drained, 60, "the worker takes the abandoned lease over")
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait() == 0
        assert fake.requests == []  # no second provider call
        assert await d.stored("pi-yard") == [7]
        (got,) = await d.results(url, dev)
        assert got["seq"] == 7


# --- dead letters through the CLI -----------------------------------------------------------


async def test_dlq_list_and_requeue_through_the_cli(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str, postgres_dsn: str
) -> None:
    async with deployment(tmp_path, redis_server, redis_prefix, postgres_dsn) as d:
        box_a, box_b = d.boxes
        # Events of a device the store does not know (say, restored from a backup taken before
        # it enrolled): the worker dead-letters them, they cannot succeed as things stand.
        keys = DeviceKeys.generate()
        cloud_pk = d.keys.public()
        ghost = Device("pi-garage", keys, cloud_pk)
        for seq in (5, 6):
            env = ghost.seal(make_event("pi-garage", seq))
            header = peek_header(env, max_bytes=len(env))
            await d.queue.enqueue(QueuedEvent("pi-garage", seq, header.payload_hash, env,
                                              time.time()))
        code, out, err = await box_a.run("cloud", "worker", "--burst")
        assert code == 0, err[-3000:]
        code, out, err = await box_b.run("cloud", "dlq", "list")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:2] == ["KEY", "ATTEMPTS"]
        # (in the order they failed: the worker had both in flight at once)
        assert sorted(ln.split()[0] for ln in lines[1:3]) == ["pi-garage:5", "pi-garage:6"]
        assert all("device unknown" in ln for ln in lines[1:3]), out

        # Requeue of a key that is not there: one clear error, nothing changed.
        code, out, err = await box_b.run("cloud", "dlq", "requeue", "pi-garage:99")
        assert code != 0 and "not in the dead-letter queue" in err and "Traceback" not in err
        code, out, err = await box_b.run("cloud", "dlq", "requeue", "not a key")
        assert code != 0 and "DEVICE:SEQ" in err

        # The cause is fixed (the device enrolls with its keys), then its events go back.
        url = await box_a.serve()
        await d.enroll(url, "pi-garage", keys)
        code, out, err = await box_b.run("cloud", "dlq", "requeue", "pi-garage:6")
        assert (code, out.strip()) == (0, "requeued pi-garage:6"), err
        code, out, err = await box_b.run("cloud", "dlq", "requeue", "--all")
        assert (code, out.strip()) == (0, "requeued pi-garage:5"), err
        code, out, err = await box_b.run("cloud", "dlq")
        assert (code, out.strip()) == (0, "the dead-letter queue is empty"), err
        code, out, err = await box_a.run("cloud", "worker", "--burst")
        assert code == 0 and "done 2" in out, out + err[-3000:]
        assert sorted(await d.stored("pi-garage")) == [5, 6]
        assert await d.queue_empty()


# --- Redis itself crashing or going away ----------------------------------------------------


async def test_queue_state_survives_a_redis_crash() -> None:
    """SIGKILL redis-server (appendonly, appendfsync always) and start it again from its files:
    queued events, a worker's lease, dead letters and dedupe keys are all still there."""
    from edgekeeper.cloud.queue.base import EnqueueStatus

    from servers import start_redis

    server = start_redis()
    try:
        q = await open_queue("redis", Path("."), url=server.url, prefix="crash", max_attempts=2)
        events = []
        for seq in range(1, 41):
            env = f"sealed {seq}".encode()
            events.append(QueuedEvent("pi-1", seq, bytes(32 * [seq]), env, 1.79e9 + seq))
        statuses = await asyncio.gather(*(q.enqueue(e) for e in events))
        assert set(statuses) == {EnqueueStatus.QUEUED}
        (held,) = await q.lease("w1", count=1, visibility_s=600)
        (dying,) = await q.lease("w1", count=1, visibility_s=600)
        assert await q.dead_letter(dying, reason="cannot open")
        before = await q.stats()
        await q.close()

        server.kill()
        server.launch()

        q = await open_queue("redis", Path("."), url=server.url, prefix="crash", max_attempts=2)
        try:
            assert await q.stats() == before
            assert await q.enqueue(events[0]) is EnqueueStatus.DUPLICATE
            assert await q.ack(held)  # the lease held before the crash is still that worker's
            rest = await q.lease("w2", count=100, visibility_s=600)
            expected = set(range(1, 41)) - {held.event.seq, dying.event.seq}
            assert sorted(le.event.seq for le in rest) == sorted(expected)
            assert all(le.attempts == 1 for le in rest)
            (dead,) = await q.dead_letters()
            assert dead.event == dying.event and dead.reason == "cannot open"
        finally:
            await q.close()
    finally:
        server.stop()


async def test_ingest_answers_503_while_redis_is_down_and_recovers(tmp_path: Path) -> None:
    """Redis down: the ingest says "try later" (503 + Retry-After), so the device keeps the
    event in its outbox; back up, the same envelope is queued, once."""
    from cloudkit import running_cloud
    from servers import start_redis

    server = start_redis()
    try:
        async with running_cloud(tmp_path, queue_backend="redis", redis_url=server.url,
                                 redis_prefix="outage") as cloud:
            dev = await cloud.enroll("pi-1")
            envelope = dev.seal(make_event("pi-1", 1))
            server.kill()
            status, body, headers = await cloud.post_envelope(envelope)
            assert status == 503 and body["error"]["code"] == "unavailable", body
            assert float(headers["Retry-After"]) > 0
            server.launch()
            status, body, _ = await cloud.post_envelope(envelope)
            assert (status, body["status"]) == (202, "queued"), body
            status, body, _ = await cloud.post_envelope(envelope)
            assert (status, body["status"]) == (200, "duplicate"), body
            assert isinstance(cloud.queue, RedisStreamsQueue)
            assert await cloud.queue.keys() == [("pi-1", 1)]
    finally:
        server.stop()
