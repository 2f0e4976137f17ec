"""The worker's leases on every queue backend (cloudkit.QUEUE_BACKENDS): a reasoner call slower
than the visibility timeout keeps its lease (heartbeat), a lease lost anyway cancels the call
and stores nothing, and putting an event back for reasons that are not its own (a budget wait,
the provider down) spends none of its attempts.

Real SQLite files and the real redis-server (tests/servers.py); the reasoners here are test
doubles at the provider boundary, so a test decides when a provider call ends instead of
sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from edgekeeper import config as config_mod
from edgekeeper.backoff import Circuit
from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.budget import Budget, next_utc_midnight, utc_day
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import EventQueue, Lease, QueuedEvent
from edgekeeper.cloud.reasoners.anthropic import AnthropicReasoner
from edgekeeper.cloud.reasoners.base import NO_USAGE, Usage, Verdict
from edgekeeper.cloud.store.base import Store, UsageRecord
from edgekeeper.cloud.worker import Worker, WorkerStats
from edgekeeper.protocol import envelope as E
from edgekeeper.protocol.keys import DeviceKeys
from edgekeeper.protocol.messages import EventBody

from cloudkit import QUEUE_BACKENDS, enroll_device, make_event
from fake_anthropic import FakeAnthropic, Reply
from servers import queue_overrides

DEVICE = "pi-1"
VISIBILITY_S = 1.0


@dataclass
class Env:
    backend: str
    data_dir: Path
    overrides: dict[str, Any]
    queue: EventQueue
    store: Store
    keys: CloudKeys
    device: DeviceKeys
    max_attempts: int

    async def open_queue(self) -> EventQueue:
        """Another handle on the same queue (another worker process)."""
        return await open_queue(self.backend, self.data_dir, max_attempts=self.max_attempts,
                                **self.overrides)

    def worker(self, reasoner: Any, **kw: Any) -> Worker:
        kw.setdefault("visibility_s", VISIBILITY_S)
        kw.setdefault("concurrency", 1)
        return Worker(queue=self.queue, store=self.store, reasoner=reasoner, keys=self.keys,
                      poll_s=0.02, **kw)

    async def put(self, seq: int) -> None:
        data = E.seal_event(make_event(DEVICE, seq), device=self.device,
                            cloud_box_pk=self.keys.box_pk, sent_at=time.time(),
                            model_version="person@1.0.0")
        await self.queue.enqueue(
            QueuedEvent(DEVICE, seq, E.peek_header(data).payload_hash, data, time.time()))

    async def result_seqs(self) -> list[int]:
        return [r.seq for r in await self.store.results_after(DEVICE, 0, 1000)]


@pytest.fixture(params=QUEUE_BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    backend, max_attempts = request.param, 3
    overrides = queue_overrides(request, backend)
    data_dir = tmp_path / "cloud"
    store = await open_store("sqlite", data_dir)
    queue = await open_queue(backend, data_dir, max_attempts=max_attempts, **overrides)
    keys = await asyncio.to_thread(CloudKeys.ensure, data_dir)
    device = await enroll_device(store, DEVICE)
    yield Env(backend, data_dir, overrides, queue, store, keys, device, max_attempts)
    await queue.close()
    await store.close()


async def until(predicate: Callable[[], Awaitable[bool] | bool], what: str,
                timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        if await outcome if isinstance(outcome, Awaitable) else outcome:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(*workers: Worker) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop=stop)) for w in workers]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


def verdict(seq: int) -> Verdict:
    return Verdict("person", 0.9, f"a person (event {seq})", "notify", True, False)


@dataclass
class HeldProvider:
    """A provider whose first answer about each seq in ``hold`` waits until ``answer`` is set;
    every other call answers at once. Records every call and every cancelled one."""

    hold: set[int]
    name: str = "held"
    calls: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    answer: asyncio.Event = field(default_factory=asyncio.Event)

    async def reason(self, event: EventBody, *, model_version: str) -> Verdict:
        self.calls.append(event.seq)
        if event.seq in self.hold and self.calls.count(event.seq) == 1:
            self.started.set()
            try:
                await self.answer.wait()
            except asyncio.CancelledError:
                self.cancelled.append(event.seq)
                raise
        return verdict(event.seq)

    async def probe(self) -> Usage:
        return NO_USAGE

    async def close(self) -> None:
        return None


async def test_a_call_slower_than_the_visibility_is_answered_once(env: Env) -> None:
    provider = HeldProvider(hold={1})
    a = env.worker(provider, consumer="worker-a")
    b = env.worker(provider, consumer="worker-b")
    await env.put(1)
    async with running(a):
        await asyncio.wait_for(provider.started.wait(), 30)  # A holds seq 1; its call hangs
        called_at = time.time()
        async with running(b):
            # The lease A took before its call began is past its deadline now, twice over;
            # only the heartbeat's extensions keep seq 1 leased.
            await until(lambda: time.time() > called_at + 2 * VISIBILITY_S,
                        "two visibility timeouts to pass")
            stats = await env.queue.stats()
            assert (stats.ready, stats.leased) == (0, 1)
            # B leases expired events before newer ones: once B has answered seq 2, it has
            # polled with seq 1 past its first deadline and did not get it.
            await env.put(2)
            await until(lambda: _has(env, 2), "B to answer seq 2")
            provider.answer.set()  # the slow provider finally answers A
            await until(lambda: _has(env, 1), "A to answer seq 1")
    assert sorted(provider.calls) == [1, 2]  # one provider call per event
    assert (a.stats.done, b.stats.done, a.stats.lost, b.stats.lost) == (1, 1, 0, 0)
    assert sorted(await env.result_seqs()) == [1, 2]
    stats = await env.queue.stats()
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)


async def _has(env: Env, seq: int) -> bool:
    return await env.store.has_result(DEVICE, seq)


@dataclass
class StallingProvider:
    """Models a worker process that stalls (a long GC pause, a suspended VM) in the middle of a
    provider call: the call blocks this whole event loop, heartbeat included, until another
    consumer (a thread with its own loop and queue handle, i.e. another worker) has taken the
    event over; then the provider keeps it waiting until the call is cancelled."""

    env: Env
    name: str = "stalling"
    calls: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    stolen: list[Lease] = field(default_factory=list)

    async def reason(self, event: EventBody, *, model_version: str) -> Verdict:
        self.calls.append(event.seq)
        taken = threading.Event()
        thief = threading.Thread(target=self._take_over, args=(taken,), daemon=True)
        thief.start()
        # Deliberately blocking: no heartbeat can run while the process is frozen.
        taken.wait(30)
        thief.join(30)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(event.seq)
            raise
        raise AssertionError("unreachable")

    def _take_over(self, taken: threading.Event) -> None:
        async def lease_when_expired() -> Lease:
            queue = await self.env.open_queue()
            try:
                for _ in range(1500):  # polled, as any worker does (about 30 s at most)
                    if got := await queue.lease("thief", count=1, visibility_s=60):
                        return got[0]
                    await asyncio.sleep(0.02)
                raise AssertionError("the stalled worker's lease never expired")
            finally:
                await queue.close()

        try:
            self.stolen.append(asyncio.run(lease_when_expired()))
        finally:
            taken.set()

    async def probe(self) -> Usage:
        return NO_USAGE

    async def close(self) -> None:
        return None


async def test_a_lease_lost_during_the_call_cancels_it_and_stores_nothing(env: Env) -> None:
    provider = StallingProvider(env)
    worker = env.worker(provider, consumer="stalled")
    await env.put(1)
    with capture_logs() as logs:
        async with running(worker):
            await until(lambda: worker.stats.lost == 1, "the worker to notice its lost lease")
    assert provider.calls == [1] and provider.cancelled == [1]  # the call was abandoned
    (stolen,) = provider.stolen
    assert stolen.event.seq == 1 and stolen.attempts == 2
    assert not await env.store.has_result(DEVICE, 1)  # nothing stored...
    assert await env.queue.ack(stolen)  # ...and neither acked nor nacked: the thief's to settle
    s: WorkerStats = worker.stats
    assert (s.done, s.retried, s.dead, s.lost) == (0, 0, 0, 1)
    (lost,) = [e for e in logs if e["event"] == "worker.lease_lost"]
    assert (lost["device_id"], lost["seq"], lost["during"]) == (DEVICE, 1, "reasoning")


# --- waits that are not the event's fault spend no attempt -----------------------------------


@dataclass
class Clock:
    """The worker's wall clock, held by the test (to cross a UTC midnight on demand)."""

    now: float

    def __call__(self) -> float:
        return self.now


async def _count_or_dead(env: Env, count: Callable[[], int], target: int) -> bool:
    """``count()`` reached ``target``, or the event was dead-lettered (the failure to catch)."""
    return count() >= target or bool(await env.queue.dead_letters())


async def test_budget_waits_beyond_max_attempts_never_dead_letter(env: Env) -> None:
    midnight = next_utc_midnight(time.time())
    clock = Clock(midnight - 0.05)  # the last moments of a UTC day, held there
    cfg = config_mod.build_from_dict({"budget": {"device_daily_usd": 0.5}}, source="test")
    # The device spent its day's budget already.
    await env.store.record_usage(UsageRecord(
        "msg_earlier", DEVICE, 0, utc_day(clock.now), "anthropic:m", "m", 1000, 100, 0, 0, 1.0,
        clock.now))
    provider = HeldProvider(hold=set())
    worker = env.worker(provider, budget=Budget(cfg.budget, env.store), over_budget="wait",
                        budget_reset_spread_s=0.0, clock=clock)
    await env.put(1)
    waits = env.max_attempts + 2
    async with running(worker):
        # Each wait lasts until the (held) clock's midnight: 0.05 s of real time, so the event
        # is delivered and put back again and again, as it would be on days of waiting.
        await until(lambda: _count_or_dead(env, lambda: worker.stats.waiting, waits),
                    f"{waits} budget waits")
        assert await env.queue.dead_letters() == []
        assert worker.stats.dead == 0
        clock.now = midnight + 1.0  # a new UTC day: the budget is fresh
        await until(lambda: _has(env, 1), "the event to be reasoned about")
    assert provider.calls == [1]
    s = worker.stats
    assert s.waiting >= waits and (s.done, s.dead, s.retried) == (1, 0, 0)
    stats = await env.queue.stats()
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)


async def test_provider_outages_beyond_max_attempts_never_dead_letter(env: Env) -> None:
    # The provider answers the circuit's probes but fails every event call: the worker's
    # circuit closes and opens again and again, each time putting the event back.
    key = "fake-key-leases"
    async with FakeAnthropic(api_key=key) as fake:
        fake.responder = lambda req: None if "Health check" in req.text else Reply.overloaded()
        cfg = config_mod.build_from_dict(
            {"reasoner": {"transcriber": "none", "max_retries": 0}}, source="test")
        claude = AnthropicReasoner(config=cfg, environ={"ANTHROPIC_API_KEY": key,
                                                         "ANTHROPIC_BASE_URL": fake.url})
        try:
            worker = env.worker(claude, circuit=Circuit(0.05, 0.1))
            await env.put(1)
            outages = env.max_attempts + 2
            async with running(worker):
                await until(lambda: _count_or_dead(env, lambda: worker.stats.deferred, outages),
                            f"{outages} failed calls")
                assert await env.queue.dead_letters() == []
                assert worker.stats.dead == 0
                fake.responder = None  # the provider is back for good
                await until(lambda: _has(env, 1), "the event to be reasoned about")
        finally:
            await claude.close()
    failed = [r for r in fake.requests if '"seq"' in r.text and r.status == 529]
    answered = [r for r in fake.requests if '"seq"' in r.text and r.status == 200]
    assert len(failed) >= outages and len(answered) == 1
    s = worker.stats
    assert (s.done, s.dead, s.retried) == (1, 0, 0) and s.deferred >= outages
    assert fake.problems == []


class SwallowsCancel:
    """The queue, except that a heartbeat's ``extend`` in flight when it is cancelled swallows
    the cancellation and answers as if it had extended (what a client library that catches
    CancelledError on a half-read reply and retries does)."""

    def __init__(self, inner: EventQueue) -> None:
        self.inner = inner
        self.swallowed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def extend(self, lease: Lease, *, visibility_s: float) -> bool:
        try:
            await asyncio.sleep(0.3)  # the round trip the cancellation lands in
        except asyncio.CancelledError:
            if self.swallowed:  # once is enough to show it (and lets the test end)
                raise
            self.swallowed += 1
        return await self.inner.extend(lease, visibility_s=visibility_s)


async def test_the_heartbeat_ends_with_the_call_even_if_its_cancel_is_swallowed(
    env: Env,
) -> None:
    """Found by the fleet simulator (bench/fleet.py): after a Redis restart, events whose
    provider call had ended stayed leased for good. Their heartbeat, cancelled when the call
    ended, lost the cancellation inside the queue client, went on extending the lease every
    few seconds, and the event never finished: no result, no ack, and no other worker could
    take it over. The heartbeat now stops when the call it watches is done."""
    queue = SwallowsCancel(env.queue)
    provider = HeldProvider(hold={1})
    worker = Worker(queue=queue, store=env.store, reasoner=provider,  # type: ignore[arg-type]
                    keys=env.keys, poll_s=0.02, visibility_s=0.6, concurrency=1)
    await env.put(1)
    async with running(worker):
        await until(provider.started.is_set, "the call starts")
        # Answer while a heartbeat's extend is in flight, so the cancel lands inside it.
        every = 0.6 / 3
        await asyncio.sleep(every + 0.1)
        provider.answer.set()
        await until(lambda: queue.swallowed > 0, "a heartbeat swallows its cancel", 10)
        await until(env.result_seqs, "the result is stored", 10)

        async def drained() -> bool:
            stats = await env.queue.stats()
            return stats.ready + stats.leased == 0

        await until(drained, "the event is acked, not held by its heartbeat", 10)
    assert await env.result_seqs() == [1]
    assert provider.calls == [1]
