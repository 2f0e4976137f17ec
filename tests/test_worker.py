"""The minimal worker: real SQLite queue and store, real envelopes, the echo reasoner, and two
reasoners written here that fail the way a provider can (they are the boundary, not our code)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import EventQueue, QueuedEvent
from edgekeeper.cloud.reasoners.base import ReasonerUnavailable, Verdict, load_reasoner
from edgekeeper.cloud.reasoners.echo import EchoReasoner
from edgekeeper.cloud.store.base import Store
from edgekeeper.cloud.worker import Worker
from edgekeeper.errors import ConfigError, PermanentError
from edgekeeper.protocol import envelope as E
from edgekeeper.protocol.keys import DeviceKeys
from edgekeeper.protocol.messages import EventBody, payload_digest

from cloudkit import enroll_device, make_event


@dataclass
class Env:
    queue: EventQueue
    store: Store
    keys: CloudKeys
    device: DeviceKeys


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = await open_store("sqlite", tmp_path)
    queue = await open_queue("sqlite", tmp_path, max_attempts=2)
    keys = await asyncio.to_thread(CloudKeys.ensure, tmp_path)
    device = await enroll_device(store, "pi-1")
    yield Env(queue, store, keys, device)
    await queue.close()
    await store.close()


async def put(env: Env, seq: int, *, envelope: bytes | None = None) -> EventBody:
    body = make_event("pi-1", seq)
    data = envelope or E.seal_event(body, device=env.device, cloud_box_pk=env.keys.box_pk,
                                    sent_at=time.time() - 86400,  # waited a day: still fine
                                    model_version="person@1.0.0")
    await env.queue.enqueue(QueuedEvent("pi-1", seq, E.peek_header(data).payload_hash, data,
                                        time.time()))
    return body


def worker(env: Env, reasoner: object | None = None) -> Worker:
    return Worker(queue=env.queue, store=env.store, reasoner=reasoner or EchoReasoner(),  # type: ignore[arg-type]
                  keys=env.keys, concurrency=3)


async def test_burst_drains_and_stores_sealed_provisional_results(env: Env) -> None:
    bodies = [await put(env, seq) for seq in range(1, 8)]
    stats = await worker(env).run(burst=True)
    assert (stats.done, stats.retried, stats.dead) == (7, 0, 0)
    assert (await env.queue.stats()).ready == 0
    rows = await env.store.results_after("pi-1", 0, 100)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    for row, body in zip(rows, bodies, strict=True):
        opened = E.open_result(row.envelope, device=env.device, device_id="pi-1",
                               cloud_box_pk=env.keys.box_pk)
        assert opened.body.reasoner == "echo" and opened.body.provisional is True
        assert opened.body.label == body.meta["label"] and opened.body.gate_correct is None
        assert b"person" not in row.envelope  # stored sealed, never in clear


async def test_revoked_device_events_are_dead_lettered(env: Env) -> None:
    await put(env, 1)
    await env.store.revoke("pi-1", now=time.time())
    stats = await worker(env).run(burst=True)
    assert stats.dead == 1 and stats.done == 0
    (dead,) = await env.queue.dead_letters()
    assert dead.reason == "device revoked"
    assert await env.store.results_after("pi-1", 0, 10) == []


async def test_payload_hash_mismatch_is_dead_lettered(env: Env) -> None:
    body = make_event("pi-1", 1).encode()
    bad = E.seal_event(body, device=env.device, cloud_box_pk=env.keys.box_pk, sent_at=1.0,
                       model_version="m", payload_hash=payload_digest(b"something else"))
    await put(env, 1, envelope=bad)
    stats = await worker(env).run(burst=True)
    assert stats.dead == 1
    assert "payload_hash" in (await env.queue.dead_letters())[0].reason


class Flaky:
    """A reasoner whose provider is down for the first ``failures`` calls."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def reason(self, event: EventBody, *, model_version: str) -> Verdict:
        self.calls += 1
        if self.calls <= self.failures:
            raise ReasonerUnavailable("provider returned 529 overloaded")
        return Verdict("person", 0.8, "a person at the door", "notify", True, False)

    async def close(self) -> None:
        return None


class Refuses:
    name = "refuses"

    async def reason(self, event: EventBody, *, model_version: str) -> Verdict:
        raise PermanentError("the provider refuses this content")

    async def close(self) -> None:
        return None


async def test_unavailable_reasoner_is_retried_later(env: Env) -> None:
    await put(env, 1)
    flaky = Flaky(failures=10)
    stats = await worker(env, flaky).run(burst=True)
    # Nacked with a delay (5 s, doubling): burst mode stops instead of spinning on it.
    assert (stats.done, stats.retried, stats.dead, flaky.calls) == (0, 1, 0, 1)
    stats_q = await env.queue.stats()
    assert (stats_q.ready, stats_q.dead) == (0, 0)


async def test_unavailable_reasoner_dead_letters_after_max_attempts(env: Env) -> None:
    await put(env, 1)
    flaky = Flaky(failures=10)
    w = Worker(queue=env.queue, store=env.store, reasoner=flaky, keys=env.keys,
               retry_base_s=0.0)  # retry at once, so one burst sees every attempt
    stats = await w.run(burst=True)
    assert (stats.done, stats.retried, stats.dead, flaky.calls) == (0, 1, 1, 2)
    (dead,) = await env.queue.dead_letters()
    assert dead.attempts == 2 and dead.reason.startswith("reasoner unavailable")


async def test_provider_back_after_a_failure_gives_a_real_result(env: Env) -> None:
    await put(env, 1)
    flaky = Flaky(failures=1)
    w = Worker(queue=env.queue, store=env.store, reasoner=flaky, keys=env.keys,
               retry_base_s=0.0)
    stats = await w.run(burst=True)
    assert (stats.done, stats.retried, stats.dead) == (1, 1, 0)


async def test_reasoner_refusal_is_dead_lettered_at_once(env: Env) -> None:
    await put(env, 1)
    stats = await worker(env, Refuses()).run(burst=True)
    assert stats.dead == 1
    assert "refuses" in (await env.queue.dead_letters())[0].reason


async def test_recovered_reasoner_result_is_not_provisional(env: Env) -> None:
    await put(env, 1)
    flaky = Flaky(failures=0)
    assert (await worker(env, flaky).run(burst=True)).done == 1
    (row,) = await env.store.results_after("pi-1", 0, 10)
    body = E.open_result(row.envelope, device=env.device, device_id="pi-1",
                         cloud_box_pk=env.keys.box_pk).body
    assert (body.reasoner, body.provisional, body.gate_correct, body.action) == (
        "flaky", False, True, "notify")


def test_unknown_reasoner_name_is_a_config_error() -> None:
    assert load_reasoner("echo").name == "echo"
    with pytest.raises(ConfigError, match=r"cloud\.reasoner"):
        load_reasoner("gpt-17")
