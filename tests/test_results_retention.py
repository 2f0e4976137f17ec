"""Results retention: workers delete acknowledged results older than
``cloud.results_retention_seconds`` and keep everything a device or a redelivery may still need.
Every store backend (cloudkit.STORE_BACKENDS: a SQLite file, a real PostgreSQL database), a real
SQLite queue, real sealed envelopes and the echo reasoner."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgekeeper import config as config_mod
from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import EventQueue, QueuedEvent
from edgekeeper.cloud.reasoners.echo import EchoReasoner
from edgekeeper.cloud.store.base import Store
from edgekeeper.cloud.worker import Worker, build_worker
from edgekeeper.errors import ConfigError
from edgekeeper.protocol import envelope as E
from edgekeeper.protocol.keys import DeviceKeys

from cloudkit import STORE_BACKENDS, enroll_device, make_event
from servers import store_overrides

DEVICE = "pi-1"
DAY = 86400.0


@dataclass
class Env:
    queue: EventQueue
    store: Store
    keys: CloudKeys
    device: DeviceKeys

    async def result(self, seq: int, *, acked_days_ago: float | None) -> int:
        """A result for ``seq`` made 60 days ago, acknowledged by the device that many days
        ago (None: never)."""
        now = time.time()
        rid = await self.store.put_result(device_id=DEVICE, seq=seq, envelope=b"sealed %d" % seq,
                                          now=now - 60 * DAY)
        if acked_days_ago is not None:
            assert await self.store.ack_results(DEVICE, [rid],
                                                now=now - acked_days_ago * DAY) == 1
        return rid


@pytest.fixture(params=STORE_BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    store = await open_store(request.param, tmp_path, **store_overrides(request, request.param))
    queue = await open_queue("sqlite", tmp_path, max_attempts=3)
    keys = await asyncio.to_thread(CloudKeys.ensure, tmp_path)
    device = await enroll_device(store, DEVICE)
    yield Env(queue, store, keys, device)
    await queue.close()
    await store.close()


async def test_worker_prunes_old_acknowledged_results_only(env: Env) -> None:
    await env.result(1, acked_days_ago=8)  # past the 7 days: goes
    await env.result(2, acked_days_ago=6)  # acked within the retention: stays
    await env.result(3, acked_days_ago=None)  # never fetched (device offline): stays
    # Seq 4's worker stored its result and died before acking; the device has since fetched
    # and acked the result. The event is still queued: its redelivery must find the result.
    await env.result(4, acked_days_ago=1)
    data = E.seal_event(make_event(DEVICE, 4), device=env.device, cloud_box_pk=env.keys.box_pk,
                        sent_at=time.time(), model_version="person@1.0.0")
    await env.queue.enqueue(
        QueuedEvent(DEVICE, 4, E.peek_header(data).payload_hash, data, time.time()))

    worker = Worker(queue=env.queue, store=env.store, reasoner=EchoReasoner(), keys=env.keys,
                    results_retention_s=7 * DAY)
    stats = await worker.run(burst=True)
    assert stats.pruned == 1
    assert [await env.store.has_result(DEVICE, s) for s in (1, 2, 3, 4)] == [
        False, True, True, True]
    assert (stats.skipped, stats.done) == (1, 0)  # seq 4: acked with no second reasoner call
    assert [r.seq for r in await env.store.results_after(DEVICE, 0, 10)] == [3]


async def test_retention_zero_keeps_every_result(env: Env) -> None:
    await env.result(1, acked_days_ago=3650)
    worker = Worker(queue=env.queue, store=env.store, reasoner=EchoReasoner(), keys=env.keys,
                    results_retention_s=0.0)
    stats = await worker.run(burst=True)
    assert stats.pruned == 0 and await env.store.has_result(DEVICE, 1)


async def test_the_configured_retention_reaches_the_worker(env: Env) -> None:
    cfg = config_mod.build_from_dict(
        {"cloud": {"reasoner": "echo", "results_retention_seconds": 2 * DAY}}, source="test")
    await env.result(1, acked_days_ago=3)
    await env.result(2, acked_days_ago=1)
    async with contextlib.AsyncExitStack() as stack:
        worker = build_worker(cfg, queue=env.queue, store=env.store, keys=env.keys, stack=stack)
        stats = await worker.run(burst=True)
    assert stats.pruned == 1
    assert not await env.store.has_result(DEVICE, 1) and await env.store.has_result(DEVICE, 2)


def test_default_retention_is_a_week() -> None:
    cfg = config_mod.build_from_dict({}, source="test")
    assert cfg.cloud.results_retention_seconds == 7 * DAY


@pytest.mark.parametrize(("retention", "visibility"), [(3600.0, 120.0), (2 * DAY, DAY / 2)])
def test_a_retention_a_queued_event_could_outlive_is_refused(retention: float,
                                                             visibility: float) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.build_from_dict(
            {"cloud": {"results_retention_seconds": retention,
                       "queue_visibility_seconds": visibility}}, source="test")
    assert "results_retention_seconds" in str(info.value)
    assert "queue_visibility_seconds" in str(info.value)


@pytest.mark.parametrize("retention", [0.0, DAY, 30 * DAY])
def test_zero_or_a_long_enough_retention_is_accepted(retention: float) -> None:
    cfg = config_mod.build_from_dict({"cloud": {"results_retention_seconds": retention}},
                                     source="test")
    assert cfg.cloud.results_retention_seconds == retention
