"""The worker with real reasoners: the real anthropic SDK against the fake Messages API, real
SQLite queue and store files, real sealed envelopes; provider outages, effectively-once,
budgets (wait and cheaper), fallback, malformed answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgekeeper import config as config_mod
from edgekeeper.backoff import Circuit
from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.budget import Budget, utc_day
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import EventQueue, QueuedEvent
from edgekeeper.cloud.reasoners.anthropic import AnthropicReasoner
from edgekeeper.cloud.reasoners.base import Reasoner
from edgekeeper.cloud.reasoners.offline import OfflineReasoner
from edgekeeper.cloud.store.base import Store
from edgekeeper.cloud.worker import Worker, WorkerStats, build_reasoners
from edgekeeper.errors import ConfigError
from edgekeeper.protocol import envelope as E
from edgekeeper.protocol.keys import DeviceKeys
from edgekeeper.protocol.messages import ResultBody

from cloudkit import enroll_device, make_event
from fake_anthropic import FakeAnthropic, RecordedRequest, Reply

KEY = "fake-key-worker-test"
DEVICE = "pi-1"


@dataclass
class Env:
    tmp: Path
    queue: EventQueue
    store: Store
    keys: CloudKeys
    device: DeviceKeys
    fake: FakeAnthropic
    made: list[Reasoner]

    def config(self, **sections: Any) -> config_mod.Config:
        data: dict[str, Any] = {"reasoner": {"transcriber": "none", "max_retries": 0}}
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return config_mod.build_from_dict(data, source="test")

    def claude(self, model: str | None = None, **reasoner: Any) -> AnthropicReasoner:
        r = AnthropicReasoner(config=self.config(reasoner=reasoner), model=model,
                              environ={"ANTHROPIC_API_KEY": KEY,
                                       "ANTHROPIC_BASE_URL": self.fake.url})
        self.made.append(r)
        return r

    def offline(self) -> OfflineReasoner:
        r = OfflineReasoner(transcriber=None)
        self.made.append(r)
        return r

    def worker(self, reasoner: Reasoner | None = None, *, queue: EventQueue | None = None,
               **kw: Any) -> Worker:
        kw.setdefault("circuit", Circuit(0.2, 0.5))
        kw.setdefault("retry_base_s", 0.0)
        return Worker(queue=queue or self.queue, store=self.store,
                      reasoner=reasoner or self.claude(), keys=self.keys,
                      concurrency=kw.pop("concurrency", 4), poll_s=0.05, **kw)

    async def put(self, seq: int, *, queue: EventQueue | None = None) -> None:
        body = make_event(DEVICE, seq)
        data = E.seal_event(body, device=self.device, cloud_box_pk=self.keys.box_pk,
                            sent_at=time.time(), model_version="person@1.0.0")
        await (queue or self.queue).enqueue(
            QueuedEvent(DEVICE, seq, E.peek_header(data).payload_hash, data, time.time()))

    async def results(self) -> dict[int, ResultBody]:
        rows = await self.store.results_after(DEVICE, 0, 1000)
        out: dict[int, ResultBody] = {}
        for row in rows:
            assert row.seq not in out, f"two results for seq {row.seq}"
            out[row.seq] = E.open_result(row.envelope, device=self.device, device_id=DEVICE,
                                         cloud_box_pk=self.keys.box_pk).body
        return out


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = await open_store("sqlite", tmp_path)
    queue = await open_queue("sqlite", tmp_path, max_attempts=3)
    keys = await asyncio.to_thread(CloudKeys.ensure, tmp_path)
    device = await enroll_device(store, DEVICE)
    # Probes carry no frame, so images are not required by the fake; event requests are
    # checked for theirs below.
    async with FakeAnthropic(api_key=KEY) as fake:
        e = Env(tmp_path, queue, store, keys, device, fake, [])
        yield e
        for r in e.made:
            await r.close()
    await queue.close()
    await store.close()


def event_calls(fake: FakeAnthropic, status: int | None = 200) -> list[RecordedRequest]:
    """Requests about events (not circuit probes), optionally only those answered ``status``."""
    return [r for r in fake.requests
            if '"seq"' in r.text and (status is None or r.status == status)]


def seq_of(req: RecordedRequest) -> int:
    import json

    return int(json.loads(req.text.split("\n", 1)[1])["seq"])


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[WorkerStats]]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_provider_outage_every_event_gets_exactly_one_result(env: Env) -> None:
    for seq in range(1, 9):
        await env.put(seq)
    env.fake.default = Reply.overloaded()
    worker = env.worker(concurrency=4)
    async with running(worker):
        # The outage: the first events fail, the circuit opens and the worker probes.
        await until(lambda: _probes_failed(env.fake, 2), "two failed probes")
        failed_event_calls = len(event_calls(env.fake, 529))
        env.fake.default = Reply.ok()  # the provider recovers
        await until(lambda: _count_results(env, 8), "8 results")
    stats = worker.stats
    results = await env.results()
    assert sorted(results) == list(range(1, 9))
    assert all(r.reasoner == "anthropic:claude-sonnet-4-6" and not r.provisional
               for r in results.values())
    # While the circuit was open only probes went out: the events that failed were the ones
    # in flight when the outage began (at most one batch of concurrency).
    assert 1 <= failed_event_calls <= 4
    # Exactly one successful provider call per event: nothing answered twice.
    ok = sorted(seq_of(r) for r in event_calls(env.fake, 200))
    assert ok == list(range(1, 9))
    q = await env.queue.stats()
    assert (q.ready, q.leased, q.dead) == (0, 0, 0)
    assert stats.done == 8 and stats.dead == 0 and stats.provider_failures >= 1
    assert stats.probes >= 3 and not worker.circuit.is_open
    assert env.fake.problems == []
    assert all(r.images for r in event_calls(env.fake, None))


async def _probes_failed(fake: FakeAnthropic, n: int) -> bool:
    return sum(1 for r in fake.requests if "Health check" in r.text and r.status == 529) >= n


async def _count_results(env: Env, n: int) -> bool:
    return len(await env.store.results_after(DEVICE, 0, 1000)) >= n


async def test_burst_mode_leaves_events_queued_while_the_provider_is_down(env: Env) -> None:
    for seq in range(1, 4):
        await env.put(seq)
    env.fake.default = Reply.server_error(503)
    stats = await env.worker(concurrency=1).run(burst=True)
    # Put back uncharged (the outage is not the event's fault), not retried.
    assert (stats.done, stats.dead, stats.retried, stats.deferred) == (0, 0, 0, 1)
    assert len(event_calls(env.fake, None)) == 1  # no second event sent into the outage
    assert (await env.queue.stats()).dead == 0
    assert len(await env.queue.keys()) == 3  # type: ignore[attr-defined]


async def test_redelivered_event_with_a_stored_result_makes_no_second_call(env: Env) -> None:
    await env.put(1)
    stats = await env.worker().run(burst=True)
    assert stats.done == 1 and len(env.fake.requests) == 1
    # The same event delivered again (as after a worker died between storing its result and
    # acking): a second queue holds the very same envelope; the store is shared.
    again = await open_queue("sqlite", env.tmp / "second", max_attempts=3)
    try:
        await env.put(1, queue=again)
        stats = await env.worker(queue=again).run(burst=True)
        assert (stats.skipped, stats.done) == (1, 0)
        assert len(env.fake.requests) == 1  # no second provider call
        assert (await again.stats()).ready == 0
        assert len(await env.results()) == 1
    finally:
        await again.close()


async def test_usage_is_recorded_per_call(env: Env) -> None:
    for seq in (1, 2):
        await env.put(seq)
    budget = Budget(env.config().budget, env.store)
    stats = await env.worker(budget=budget).run(burst=True)
    assert stats.done == 2
    day = utc_day(time.time())
    totals = await env.store.usage_totals(day=day, device_id=DEVICE)
    assert totals.calls == 2 and totals.tokens > 0
    assert totals.cost_usd == pytest.approx(stats.cost_usd) and stats.cost_usd > 0
    assert (await env.store.usage_totals(day=day)).calls == 2
    (row,) = await env.store.usage_by_day(since_day=day)
    assert (row.device_id, row.events, row.calls) == (DEVICE, 2, 2)
    # The first call wrote the prompt cache, the second read it.
    assert row.cache_write_tokens > 0 and row.cache_read_tokens > 0


async def test_over_budget_wait_puts_the_event_back_until_tomorrow(env: Env) -> None:
    cfg = env.config(budget={"device_daily_usd": 0.000001, "over_budget": "wait"})
    await env.put(1)
    await env.put(2)
    stats = await env.worker(budget=Budget(cfg.budget, env.store), concurrency=1).run(burst=True)
    # The first call spends past the limit; the second event waits (not dropped, not reasoned).
    assert (stats.done, stats.waiting, stats.dead) == (1, 1, 0)
    assert len(event_calls(env.fake)) == 1
    assert await env.queue.keys() == [(DEVICE, 2)]  # type: ignore[attr-defined]
    q = await env.queue.stats()
    assert (q.ready, q.dead) == (0, 0)  # due again only after the next UTC midnight


async def test_spent_global_budget_pauses_leasing(env: Env) -> None:
    cfg = env.config(budget={"global_daily_usd": 0.000001, "device_daily_usd": 0})
    for seq in (1, 2, 3):
        await env.put(seq)
    w = env.worker(budget=Budget(cfg.budget, env.store), concurrency=1)
    stats = await w.run(burst=True)
    assert (stats.done, stats.waiting) == (1, 1)
    assert w._paused_until > time.time() + 1  # paused until the next UTC day
    assert len(await env.queue.keys()) == 2  # type: ignore[attr-defined]


async def test_over_budget_cheaper_model_is_provisional_and_capped(env: Env) -> None:
    cfg = env.config(budget={"device_daily_usd": 0.000001, "over_budget": "cheaper"})
    env.fake.default = Reply.ok({"label": "person", "confidence": 0.95, "summary": "a burglar",
                                 "action": "alert", "gate_correct": True})
    await env.put(1)
    await env.put(2)
    w = env.worker(budget=Budget(cfg.budget, env.store), over_budget="cheaper",
                   cheaper=env.claude(model="claude-haiku-4-5"), concurrency=1)
    stats = await w.run(burst=True)
    assert (stats.done, stats.provisional) == (2, 1)
    first, second = (await env.results())[1], (await env.results())[2]
    assert (first.reasoner, first.provisional, first.action) == (
        "anthropic:claude-sonnet-4-6", False, "alert")
    # The cheaper path answers, says so, and has less authority.
    assert (second.reasoner, second.provisional, second.action) == (
        "anthropic:claude-haiku-4-5", True, "notify")
    assert second.extra["path"] == "cheaper" and "budget" in second.extra["why"]
    assert [r.body["model"] for r in event_calls(env.fake)] == [
        "claude-sonnet-4-6", "claude-haiku-4-5"]
    assert (await env.store.usage_totals(day=utc_day(time.time()), device_id=DEVICE)).calls == 2


async def test_over_budget_cheaper_offline_when_no_cheaper_model(env: Env) -> None:
    cfg = env.config(budget={"device_daily_usd": 0.000001, "over_budget": "cheaper"})
    await env.put(1)
    await env.put(2)
    w = env.worker(budget=Budget(cfg.budget, env.store), over_budget="cheaper",
                   cheaper=env.offline(), concurrency=1)
    stats = await w.run(burst=True)
    assert stats.done == 2 and len(event_calls(env.fake)) == 1
    second = (await env.results())[2]
    assert second.reasoner.startswith("offline:") and second.provisional
    assert second.action in ("none", "log")


async def test_malformed_answers_are_retried_then_dead_lettered(env: Env) -> None:
    env.fake.default = Reply.malformed({"label": "person", "confidence": 3})
    await env.put(1)
    budget = Budget(env.config().budget, env.store)
    stats = await env.worker(budget=budget).run(burst=True)
    assert (stats.done, stats.dead) == (0, 1)
    (dead,) = await env.queue.dead_letters()
    assert dead.attempts == 3 and "malformed judgement" in dead.reason
    # Every malformed answer was paid for and counted.
    totals = await env.store.usage_totals(day=utc_day(time.time()), device_id=DEVICE)
    assert totals.calls == 3 and totals.tokens > 0


async def test_fallback_answers_provisionally_when_the_provider_is_down(env: Env) -> None:
    env.fake.default = Reply.overloaded()
    await env.put(1)
    w = env.worker(fallback=env.offline(), fallback_after_s=0.0)
    stats = await w.run(burst=True)
    assert stats.done == 1 and stats.provisional == 1
    result = (await env.results())[1]
    assert result.reasoner.startswith("offline:") and result.provisional is True
    assert result.extra["path"] == "fallback" and result.action in ("none", "log")


def test_unpriced_model_is_refused_at_start(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    cfg = config_mod.build_from_dict(
        {"reasoner": {"model": "claude-opus-9", "transcriber": "none"}}, source="test")

    async def build() -> None:
        store = await open_store("sqlite", tmp_path)
        try:
            build_reasoners(cfg, Budget(cfg.budget, store))
        finally:
            await store.close()

    with pytest.raises(ConfigError, match="claude-opus-9") as err:
        asyncio.run(build())
    assert err.value.fix and "budget.prices" in err.value.fix
