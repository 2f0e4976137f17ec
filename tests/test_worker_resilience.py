"""A worker outlives its queue backend going away: it waits and resumes, it does not exit."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from edgekeeper.cloud.backends import open_queue
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import QueuedEvent
from edgekeeper.cloud.reasoners.echo import EchoReasoner
from edgekeeper.cloud.store.sqlite import SQLiteStore
from edgekeeper.cloud.worker import Worker

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
