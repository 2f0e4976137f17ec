"""A worker outlives its queue backend going away: it waits and resumes, it does not exit."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from edgekeeper.cloud.backends import open_queue
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import QueuedEvent
from edgekeeper.cloud.reasoners.echo import EchoReasoner
from edgekeeper.cloud.store.sqlite import SQLiteStore
from edgekeeper.cloud.worker import Worker
from edgekeeper.protocol.envelope import peek_header

from cloudkit import Device, enroll_device, make_event
from servers import start_redis


async def test_worker_waits_out_a_redis_restart(tmp_path: Path) -> None:
    server = start_redis()
    store = await SQLiteStore.open(tmp_path / "store.sqlite")
    queue = await open_queue("redis", Path("."), url=server.url, prefix="resilience")
    keys = await asyncio.to_thread(CloudKeys.ensure, tmp_path)  # reads or writes key files
    worker = Worker(queue=queue, store=store, reasoner=EchoReasoner(), keys=keys,
                    concurrency=2, poll_s=0.05)
    stop = asyncio.Event()
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(worker.run(stop=stop))
            await asyncio.sleep(0.3)
            server.kill()
            await asyncio.sleep(1.5)  # several lease attempts fail meanwhile
            assert not task.done(), "the worker exited when Redis went away"
            server.launch()
            # Back: an event that can never open is leased and dead-lettered, so the worker
            # is leasing again.
            await queue.enqueue(QueuedEvent("ghost", 1, b"\x00" * 32, b"not an envelope", 1.0))
            for _ in range(200):
                if worker.stats.dead:
                    break
                await asyncio.sleep(0.05)
        assert worker.stats.dead == 1
        assert any(e["event"] == "worker.queue_unavailable" for e in logs)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await queue.close()
        await store.close()
        server.stop()


class _GatedEcho(EchoReasoner):
    """The echo reasoner, held mid-call until the test lets it answer."""

    def __init__(self) -> None:
        super().__init__()
        self.called = asyncio.Event()
        self.answer = asyncio.Event()

    async def reason(self, event: Any, *, model_version: str) -> Any:
        self.called.set()
        await self.answer.wait()
        return await super().reason(event, model_version=model_version)


async def test_redis_gone_between_the_result_and_its_ack_does_not_stop_the_worker(
    tmp_path: Path,
) -> None:
    """Found by the fleet simulator (bench/fleet.py, Redis restarted mid-run): an event whose
    result was stored but whose ack failed (Redis down) was retried with a nack, which failed
    too, and that second error escaped the per-event guard and took the whole worker (and every
    other event in flight) down. The lease is simply left to expire: the event comes back and
    is acked without a second reasoning (the result is stored)."""
    server = start_redis()
    store = await SQLiteStore.open(tmp_path / "store.sqlite")
    queue = await open_queue("redis", Path("."), url=server.url, prefix="ackdown")
    keys = await asyncio.to_thread(CloudKeys.ensure, tmp_path)
    dev_keys = await enroll_device(store, "pi-1")
    env = Device("pi-1", dev_keys, keys.public()).seal(make_event("pi-1", 1))
    header = peek_header(env, max_bytes=len(env))
    await queue.enqueue(QueuedEvent("pi-1", 1, header.payload_hash, env, 1.0))
    reasoner = _GatedEcho()
    worker = Worker(queue=queue, store=store, reasoner=reasoner, keys=keys, concurrency=2,
                    poll_s=0.05, visibility_s=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop=stop))
    try:
        await asyncio.wait_for(reasoner.called.wait(), 20)
        server.kill()
        reasoner.answer.set()  # the result is stored (SQLite), the ack meets a dead Redis
        for _ in range(100):
            if await store.has_result("pi-1", 1):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the ack, then the nack, fail meanwhile
        assert not task.done(), f"the worker exited: {task.exception()!r}"
        server.launch()
        for _ in range(400):  # the lease expires, the event is leased again and acked
            stats = await queue.stats()
            if stats.ready == 0 and stats.leased == 0:
                break
            await asyncio.sleep(0.05)
        assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)
        assert [r.seq for r in await store.results_after("pi-1", 0, 10)] == [1]
        assert not task.done()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await queue.close()
        await store.close()
        server.stop()
