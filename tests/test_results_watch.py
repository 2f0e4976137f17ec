"""The results long-poll wakes only the device whose result landed (cloud/ingest.py
ResultsWatch, Store.results_since): a real ingest on 127.0.0.1 over both store backends (SQLite
files, and a real PostgreSQL from tests/servers.py), results written by a second store
connection and by another process, and the store reads counted from the ingest's own
/metrics (edgekeeper_ingest_results_queries_total, _results_wakeups_total)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgekeeper.cloud.backends import open_store
from edgekeeper.cloud.store.base import Store

from cloudkit import Cloud, Device, cloud_on, enroll_device, until
from servers import store_overrides

POLL_S = 0.05


async def counts(cloud: Cloud) -> dict[str, float]:
    """The ingest's results-poll counters, as /metrics serves them."""
    async with cloud.session.get(f"{cloud.url}/metrics") as resp:
        text = await resp.text()
    out = {"since": 0.0, "version": 0.0, "rows": 0.0, "wakeups": 0.0, "open": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "edgekeeper_ingest_results_queries_total":
                out[s.labels["query"]] = s.value
            elif s.name == "edgekeeper_ingest_results_wakeups_total":
                out["wakeups"] = s.value
            elif s.name == "edgekeeper_ingest_results_polls_open":
                out["open"] = s.value
    return out


async def long_poll(cloud: Cloud, device: Device, wait: int = 30) -> list[int]:
    """One results long-poll; the seqs it answered with."""
    query = f"cursor=0&wait={wait}&limit=20"
    async with cloud.session.get(f"{cloud.url}/v1/results?{query}",
                                 headers=device.signed("GET", "/v1/results", query)) as resp:
        data = await resp.json()
        assert resp.status == 200, data
    return [r["seq"] for r in data["results"]]


@pytest.fixture
async def cloud(backend: str, tmp_path: Path, request: pytest.FixtureRequest,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cloud]:
    async with cloud_on(backend, tmp_path=tmp_path, request=request, monkeypatch=monkeypatch,
                        results_poll_seconds=POLL_S) as c:
        yield c


@pytest.fixture
async def writer(cloud: Cloud, backend: str, request: pytest.FixtureRequest
                 ) -> AsyncIterator[Store]:
    """A second store connection (what a worker on another machine holds), not the ingest's."""
    s = await open_store(backend, cloud.data_dir, **store_overrides(request, backend))
    yield s
    await s.close()


WRITE_FROM_ANOTHER_PROCESS = """
import asyncio, json, sys, time
from pathlib import Path
from edgekeeper.cloud.backends import open_store
backend, data_dir, overrides, device_id, seq = json.loads(sys.argv[1])
async def main():
    store = await open_store(backend, Path(data_dir), **overrides)
    try:
        await store.put_result(device_id=device_id, seq=seq, envelope=b"sealed", now=time.time())
    finally:
        await store.close()
asyncio.run(main())
"""


async def put_from_another_process(cloud: Cloud, backend: str, request: pytest.FixtureRequest,
                                   device_id: str, seq: int) -> None:
    overrides = store_overrides(request, backend)
    overrides.pop("pool_size", None)
    arg = json.dumps([backend, str(cloud.data_dir), overrides, device_id, seq])
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c",
                                   WRITE_FROM_ANOTHER_PROCESS, arg],
                                   capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


async def put(store: Store, device_id: str, seq: int) -> int:
    return await store.put_result(device_id=device_id, seq=seq, envelope=b"sealed",
                                  now=time.time())


async def test_a_result_wakes_only_its_devices_long_poll(
    cloud: Cloud, writer: Store, backend: str, request: pytest.FixtureRequest,
) -> None:
    a, b = await cloud.enroll("pi-a"), await cloud.enroll("pi-b")
    poll_a = asyncio.create_task(long_poll(cloud, a))
    poll_b = asyncio.create_task(long_poll(cloud, b))
    try:
        await until(lambda: _at_least(cloud, rows=2, open=2))
        # A result for pi-a from a second store connection: pi-a's poll answers with it...
        await put(writer, "pi-a", 1)
        assert await asyncio.wait_for(poll_a, 20) == [1]
        before = await counts(cloud)
        # pi-a read twice (when it came in, when woken), pi-b once; one wake-up: pi-a's.
        assert (before["rows"], before["wakeups"]) == (3, 1), before
        # ...and pi-b's poll is not woken: while the watch polls on (three more intervals),
        # nobody reads results.
        await until(lambda: _at_least(cloud, since=before["since"] + 3))
        after = await counts(cloud)
        assert (after["rows"], after["wakeups"]) == (before["rows"], 1), after
        assert not poll_b.done()
        # A result for pi-b written by another process reaches pi-b's waiting poll: one
        # wake-up, one read.
        await put_from_another_process(cloud, backend, request, "pi-b", 7)
        assert await asyncio.wait_for(poll_b, 20) == [7]
        final = await counts(cloud)
        assert (final["rows"], final["wakeups"]) == (before["rows"] + 1, 2), final
    finally:
        await _cancel(poll_a, poll_b)


async def test_many_waiting_devices_cost_one_query_per_interval(cloud: Cloud,
                                                                writer: Store) -> None:
    devices = [await cloud.enroll(f"pi-{i:02d}") for i in range(30)]
    polls = {d.device_id: asyncio.create_task(long_poll(cloud, d)) for d in devices}
    try:
        await until(lambda: _at_least(cloud, rows=len(devices), open=len(devices)))
        start, t0 = await counts(cloud), time.monotonic()
        await until(lambda: _at_least(cloud, since=start["since"] + 5))
        idle, elapsed = await counts(cloud), time.monotonic() - t0
        # While no result lands, the only store reads are the watch's, at most one per
        # interval for all 30 waiting devices (the watch polls on the loop's clock).
        assert (idle["rows"], idle["version"]) == (start["rows"], start["version"]), idle
        assert idle["since"] - start["since"] <= elapsed / POLL_S + 1, (idle, elapsed)
        # Results for three of them: those three answer, with one read each; the rest wait.
        for i, device_id in enumerate(("pi-03", "pi-17", "pi-29")):
            await put(writer, device_id, 100 + i)
        for i, device_id in enumerate(("pi-03", "pi-17", "pi-29")):
            assert await asyncio.wait_for(polls.pop(device_id), 20) == [100 + i]
        woke = await counts(cloud)
        assert woke["rows"] == idle["rows"] + 3 and woke["wakeups"] == 3, woke
        assert not any(p.done() for p in polls.values())
    finally:
        await _cancel(*polls.values())


async def test_polling_is_handed_over_when_the_poller_leaves(cloud: Cloud,
                                                             writer: Store) -> None:
    early, late = await cloud.enroll("pi-early"), await cloud.enroll("pi-late")
    # pi-early comes first, so it polls for both; its wait ends after one second.
    poll_early = asyncio.create_task(long_poll(cloud, early, wait=1))
    await until(lambda: _at_least(cloud, open=1, since=1))
    poll_late = asyncio.create_task(long_poll(cloud, late))
    try:
        assert await asyncio.wait_for(poll_early, 20) == []
        # pi-late took over the polling: a result written after pi-early left reaches it.
        before = await counts(cloud)
        await until(lambda: _at_least(cloud, since=before["since"] + 2))
        await put(writer, "pi-late", 3)
        assert await asyncio.wait_for(poll_late, 20) == [3]
    finally:
        await _cancel(poll_early, poll_late)


async def _cancel(*tasks: asyncio.Task[list[int]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _at_least(cloud: Cloud, **want: float) -> bool:
    have = await counts(cloud)
    return all(have[k] >= v for k, v in want.items())


# --- the store's query, both backends -----------------------------------------------------


@pytest.fixture
async def store(backend: str, tmp_path: Path, request: pytest.FixtureRequest
                ) -> AsyncIterator[Store]:
    s = await open_store(backend, tmp_path, **store_overrides(request, backend))
    yield s
    await s.close()


async def test_results_since_names_the_devices_with_newer_results(store: Store) -> None:
    for device_id in ("pi-a", "pi-b", "pi-c"):
        await enroll_device(store, device_id)
    empty = await store.results_since(0)
    assert (empty.version, empty.device_ids) == (0, frozenset())
    a1 = await put(store, "pi-a", 1)
    b1 = await put(store, "pi-b", 1)
    a2 = await put(store, "pi-a", 2)
    every = await store.results_since(0)
    assert (every.version, every.device_ids) == (a2, frozenset({"pi-a", "pi-b"}))
    assert every.version == await store.results_version()
    # Only what is newer than the version asked about, with the newest id among it.
    assert await store.results_since(a1) == every
    newer = await store.results_since(b1)
    assert (newer.version, newer.device_ids) == (a2, frozenset({"pi-a"}))
    # Nothing newer: the version asked about comes back. A redelivered result adds nothing,
    # and an acked one still counts (the device may have polled from another connection).
    assert await put(store, "pi-a", 2) == a2
    nothing = await store.results_since(a2)
    assert (nothing.version, nothing.device_ids) == (a2, frozenset())
    c1 = await put(store, "pi-c", 1)
    assert await store.ack_results("pi-c", [c1], now=time.time()) == 1
    acked = await store.results_since(a2)
    assert (acked.version, acked.device_ids) == (c1, frozenset({"pi-c"}))
