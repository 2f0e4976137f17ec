"""The event queue contract (cloud/queue/base.py), run against every backend in
cloudkit.QUEUE_BACKENDS: idempotent enqueue, leases, ack/nack, dead letters, durability.

Written against the Protocol only (plus ``reopen`` to model a restart), so the Redis Streams
backend joins by adding its name and a branch in ``open_backend``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from edgekeeper import log
from edgekeeper.cloud.backends import open_queue
from edgekeeper.cloud.queue.base import EnqueueStatus, EventQueue, QueuedEvent

from cloudkit import QUEUE_BACKENDS
from servers import queue_overrides

Opener = Callable[[], Awaitable[EventQueue]]


def ev(seq: int, device: str = "pi-1", payload: bytes = b"") -> QueuedEvent:
    payload = payload or f"body {device} {seq}".encode()
    return QueuedEvent(device, seq, hashlib.sha256(payload).digest(), b"sealed:" + payload,
                       1_790_000_000.0 + seq)


@pytest.fixture(params=QUEUE_BACKENDS)
async def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    opened: list[EventQueue] = []

    async def open_backend(max_attempts: int = 3) -> EventQueue:
        q = await open_queue(request.param, tmp_path / "data", max_attempts=max_attempts,
                             **queue_overrides(request, request.param))
        opened.append(q)
        return q

    yield open_backend
    for q in opened:
        await q.close()


async def test_enqueue_is_idempotent_and_detects_conflicts(make_queue: Opener) -> None:
    q = await make_queue()
    assert await q.enqueue(ev(1)) is EnqueueStatus.QUEUED
    assert await q.enqueue(ev(1)) is EnqueueStatus.DUPLICATE
    assert await q.enqueue(ev(1, payload=b"something else")) is EnqueueStatus.CONFLICT
    assert await q.enqueue(ev(1, device="pi-2")) is EnqueueStatus.QUEUED  # keys are per device
    stats = await q.stats()
    assert (stats.ready, stats.leased, stats.seen) == (2, 0, 2)


async def test_concurrent_enqueues_each_land_exactly_once(make_queue: Opener) -> None:
    q = await make_queue()
    events = [ev(i) for i in range(200)]
    # Every event twice, all at once: group commit must still answer each caller correctly.
    outcomes = await asyncio.gather(*(q.enqueue(e) for e in events + events))
    assert outcomes.count(EnqueueStatus.QUEUED) == 200
    assert outcomes.count(EnqueueStatus.DUPLICATE) == 200
    leases = await q.lease("w", count=500, visibility_s=60)
    assert sorted(le.event.seq for le in leases) == list(range(200))


async def test_lease_hides_events_and_ack_removes_them(make_queue: Opener) -> None:
    q = await make_queue()
    for i in range(5):
        await q.enqueue(ev(i))
    first = await q.lease("a", count=3, visibility_s=60)
    assert [le.event.seq for le in first] == [0, 1, 2]  # oldest first
    assert all(le.attempts == 1 and le.consumer == "a" for le in first)
    second = await q.lease("b", count=10, visibility_s=60)
    assert [le.event.seq for le in second] == [3, 4]
    assert await q.lease("c", count=10, visibility_s=60) == []
    assert first[0].event == ev(0)
    for le in first + second:
        assert await q.ack(le)
    assert not await q.ack(first[0])  # twice: nothing left to ack
    stats = await q.stats()
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)
    # An acked key still dedupes: a late retry from the device is a duplicate, not a new event.
    assert await q.enqueue(ev(0)) is EnqueueStatus.DUPLICATE


async def test_expired_lease_is_redelivered_and_old_holder_cannot_ack(make_queue: Opener) -> None:
    q = await make_queue()
    await q.enqueue(ev(1))
    (stale,) = await q.lease("dead-worker", count=1, visibility_s=0.0)  # expires at once
    (fresh,) = await q.lease("live-worker", count=1, visibility_s=60)
    assert fresh.event == stale.event and fresh.attempts == 2
    assert not await q.ack(stale)
    assert not await q.nack(stale, reason="late")
    assert await q.ack(fresh)


async def test_extend_keeps_the_lease_from_expiring(make_queue: Opener) -> None:
    q = await make_queue()
    await q.enqueue(ev(1))
    (le,) = await q.lease("slow", count=1, visibility_s=0.0)  # would expire at once...
    assert await q.extend(le, visibility_s=3600)  # ...but its holder is still working on it
    assert await q.lease("other", count=1, visibility_s=60) == []
    stats = await q.stats()
    assert (stats.ready, stats.leased) == (0, 1)
    assert await q.extend(le, visibility_s=3600)  # again and again, as a heartbeat does
    assert await q.ack(le)
    assert not await q.extend(le, visibility_s=60)  # acked: nothing left to extend


async def test_extend_after_the_lease_was_taken_over_is_refused(make_queue: Opener) -> None:
    q = await make_queue()
    await q.enqueue(ev(1))
    (stale,) = await q.lease("stalled", count=1, visibility_s=0.0)
    assert await q.extend(stale, visibility_s=0.0)  # still its own: expires at once again
    (fresh,) = await q.lease("live", count=1, visibility_s=60)
    assert fresh.event == stale.event and fresh.attempts == 2  # a heartbeat is no delivery
    # The stalled worker's heartbeat arrives late: refused, and it takes nothing back.
    assert not await q.extend(stale, visibility_s=3600)
    assert await q.extend(fresh, visibility_s=60)
    assert not await q.ack(stale)
    assert await q.ack(fresh)


async def test_extend_after_nack_or_dead_letter_is_refused(make_queue: Opener) -> None:
    q = await make_queue()
    await q.enqueue(ev(1))
    await q.enqueue(ev(2))
    first, second = await q.lease("w", count=2, visibility_s=60)
    assert await q.nack(first, reason="later", delay_s=3600)
    assert await q.dead_letter(second, reason="cannot open")
    assert not await q.extend(first, visibility_s=60)
    assert not await q.extend(second, visibility_s=60)
    assert await q.lease("w", count=2, visibility_s=60) == []  # the nack's delay still holds


async def test_release_spends_no_attempt(make_queue: Opener) -> None:
    # A budget wait or a provider outage, day after day: never the event's fault, so never
    # dead-lettered for it, however often it happens.
    q = await make_queue(max_attempts=2)
    await q.enqueue(ev(1))
    for _ in range(5):
        (le,) = await q.lease("w", count=1, visibility_s=60)
        assert le.attempts == 1
        assert await q.release(le)
    assert await q.dead_letters() == []
    # Real failures still count, from where they were: two nacks and it is dead.
    (le,) = await q.lease("w", count=1, visibility_s=60)
    assert await q.nack(le, reason="boom 1")
    (le,) = await q.lease("w", count=1, visibility_s=60)
    assert le.attempts == 2
    assert await q.release(le)  # a wait after a failure does not reset the count either
    (le,) = await q.lease("w", count=1, visibility_s=60)
    assert le.attempts == 2
    assert not await q.nack(le, reason="boom 2")
    (dead,) = await q.dead_letters()
    assert dead.attempts == 2 and dead.reason == "boom 2"


async def test_release_delay_and_lost_leases(make_queue: Opener) -> None:
    q = await make_queue()
    await q.enqueue(ev(1))
    (le,) = await q.lease("w", count=1, visibility_s=60)
    assert await q.release(le, delay_s=3600)
    assert await q.lease("w", count=1, visibility_s=60) == []
    stats = await q.stats()
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)
    assert not await q.release(le)  # released already: that lease is over
    assert not await q.ack(le)

    await q.enqueue(ev(2))
    (stale,) = await q.lease("stalled", count=1, visibility_s=0.0)
    (fresh,) = await q.lease("live", count=1, visibility_s=60)
    assert not await q.release(stale)  # taken over: no change
    assert await q.release(fresh)
    (again,) = await q.lease("live", count=1, visibility_s=60)
    # Each delivery has its own receipt, released ones too: an old lease settles nothing.
    assert again.event == fresh.event and again.attempts == 2
    assert not await q.ack(fresh) and not await q.extend(fresh, visibility_s=60)
    assert await q.ack(again)


async def test_nack_redelivers_then_dead_letters(make_queue: Opener) -> None:
    q = await make_queue(max_attempts=3)
    await q.enqueue(ev(9))
    for attempt in (1, 2):
        (le,) = await q.lease("w", count=1, visibility_s=60)
        assert le.attempts == attempt
        assert await q.nack(le, reason=f"boom {attempt}")
    (le,) = await q.lease("w", count=1, visibility_s=60)
    assert le.attempts == 3
    assert not await q.nack(le, reason="boom 3")  # attempts used up
    assert await q.lease("w", count=1, visibility_s=60) == []
    (dead,) = await q.dead_letters()
    assert dead.event == ev(9) and dead.attempts == 3 and dead.reason == "boom 3"


async def test_nack_delay_keeps_the_event_back(make_queue: Opener) -> None:
    q = await make_queue()
    await q.enqueue(ev(1))
    (le,) = await q.lease("w", count=1, visibility_s=60)
    assert await q.nack(le, reason="later", delay_s=3600)
    assert await q.lease("w", count=1, visibility_s=60) == []
    assert (await q.stats()).ready == 0


async def test_poison_event_that_kills_its_workers_is_dead_lettered(make_queue: Opener) -> None:
    q = await make_queue(max_attempts=2)
    await q.enqueue(ev(1))
    await q.enqueue(ev(2))
    for _ in range(2):  # two workers die holding seq 1 (leases expire, never acked)
        (le, *_rest) = await q.lease("w", count=1, visibility_s=0.0)
        assert le.event.seq == 1
    leases = await q.lease("w", count=5, visibility_s=60)
    assert [le.event.seq for le in leases] == [2]
    (dead,) = await q.dead_letters()
    assert dead.event.seq == 1 and "without ack" in dead.reason


async def test_dead_letter_now(make_queue: Opener) -> None:
    q = await make_queue()
    await q.enqueue(ev(1))
    (le,) = await q.lease("w", count=1, visibility_s=60)
    assert await q.dead_letter(le, reason="cannot open")
    assert not await q.ack(le)
    assert [d.reason for d in await q.dead_letters()] == ["cannot open"]


async def test_survives_restart(make_queue: Opener) -> None:
    q = await make_queue()
    await q.enqueue(ev(1))
    await q.enqueue(ev(2))
    await q.close()
    q2 = await make_queue()
    assert await q2.enqueue(ev(1)) is EnqueueStatus.DUPLICATE
    assert [le.event.seq for le in await q2.lease("w", count=5, visibility_s=60)] == [1, 2]


async def test_two_handles_share_one_queue(make_queue: Opener) -> None:
    # The ingest and a worker are separate processes on the same backend.
    ingest, worker = await make_queue(), await make_queue()
    await ingest.enqueue(ev(1))
    (le,) = await worker.lease("w", count=1, visibility_s=60)
    assert await worker.ack(le)
    assert await ingest.enqueue(ev(1)) is EnqueueStatus.DUPLICATE
    await ingest.ping()


async def test_queued_means_committed_to_disk(tmp_path: Path) -> None:
    # SQLite-specific: what another connection sees right after QUEUED, and the pragmas.
    q = await open_queue("sqlite", tmp_path, max_attempts=3)
    try:
        await q.enqueue(ev(1, payload=os.urandom(50)))
        conn = sqlite3.connect(tmp_path / "queue.sqlite")
        try:
            assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()
        sync = await q._db.run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])  # type: ignore[attr-defined]
        assert sync == 2  # FULL
    finally:
        await q.close()


async def test_requeue_dead_letters(make_queue: Opener) -> None:
    # `edgekeeper cloud dlq requeue`: the cause was fixed, deliver them again with fresh attempts.
    q = await make_queue(max_attempts=1)
    for seq in (1, 2, 3):
        await q.enqueue(ev(seq))
    for le in await q.lease("w", count=3, visibility_s=60):
        assert not await q.nack(le, reason=f"broken {le.event.seq}")
    assert [d.event.seq for d in await q.dead_letters()] == [1, 2, 3]
    assert await q.requeue_dead(["pi-1:2", "pi-1:99", "nonsense"]) == ["pi-1:2"]
    assert [d.event.seq for d in await q.dead_letters()] == [1, 3]
    (le,) = await q.lease("w", count=5, visibility_s=60)
    assert le.event == ev(2) and le.attempts == 1  # attempts start again
    assert await q.ack(le)
    # Its key is still remembered: the device's late retry is a duplicate, not a second event.
    assert await q.enqueue(ev(2)) is EnqueueStatus.DUPLICATE
    assert sorted(await q.requeue_dead()) == ["pi-1:1", "pi-1:3"]
    assert await q.dead_letters() == []
    assert await q.requeue_dead() == []
    assert sorted(le.event.seq for le in await q.lease("w", count=5, visibility_s=60)) == [1, 3]
    stats = await q.stats()
    assert (stats.ready, stats.leased, stats.dead) == (0, 2, 0)


@pytest.mark.redis
async def test_redis_refuses_a_queue_that_is_not_fsynced(redis_prefix: str) -> None:
    # A redis-server of our own with appendfsync everysec: QUEUED would not mean durable.
    from edgekeeper.errors import ConfigError

    from servers import start_redis

    server = start_redis(durable=False)
    try:
        with pytest.raises(ConfigError, match="appendfsync=everysec") as info:
            await open_queue("redis", Path("."), url=server.url, prefix=redis_prefix)
        assert "appendfsync always" in (info.value.fix or "")
        # Told to accept the risk, it opens, and says so loudly in the log.
        logged = io.StringIO()
        log.configure("warning", "json", stream=logged)
        q = await open_queue("redis", Path("."), url=server.url, prefix=redis_prefix,
                             fsync_check="warn")
        assert await q.enqueue(ev(1)) is EnqueueStatus.QUEUED
        await q.close()
        (line,) = [json.loads(x) for x in logged.getvalue().splitlines()]
        assert line["event"] == "queue.redis_not_durable" and line["level"] == "warning"
        assert "appendfsync always" in line["fix"]
    finally:
        log.configure("warning", "json")  # what conftest sets: whatever stderr is now
        server.stop()


@pytest.mark.redis
async def test_redis_unreachable_is_a_clear_config_error(redis_prefix: str) -> None:
    from edgekeeper.errors import ConfigError

    from servers import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError) as info:
        await open_queue("redis", Path("."), url=url, prefix=redis_prefix)
    assert "hunter2" not in str(info.value)  # the password never reaches an error or a log
    assert "redis_url" in (info.value.fix or "")


async def test_stats_say_how_long_the_oldest_queued_event_has_waited(make_queue: Opener) -> None:
    """/metrics' queue age: the oldest event still waiting or leased, gone once it is acked."""
    q = await make_queue()
    empty = await q.stats()
    assert empty.oldest_received_at is None and empty.oldest_age(1_790_000_100.0) == 0.0
    for seq in (1, 2, 3):
        assert await q.enqueue(ev(seq)) is EnqueueStatus.QUEUED
    stats = await q.stats()
    assert stats.oldest_received_at == 1_790_000_001.0
    assert stats.oldest_age(1_790_000_101.0) == 100.0
    (first,) = await q.lease("w1", count=1, visibility_s=60)
    assert (await q.stats()).oldest_received_at == 1_790_000_001.0  # leased still waits
    assert await q.ack(first)
    assert (await q.stats()).oldest_received_at == 1_790_000_002.0
