"""The one runtime (edgekeeper/runtime.py) as an operator meets it: real `edgekeeper` processes
sent real signals. A worker asked to stop finishes the events in hand and exits 0; a second
SIGINT leaves at once; a drain that hangs is cut at its deadline and says what was in flight; a
provider that refuses the key stops the worker with one line. The provider is the fake Messages
API (tests/fake_anthropic.py); queue and store are the embedded SQLite ones in tmp_path."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from edgekeeper import compat, runtime
from edgekeeper.backoff import Backoff
from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import QueuedEvent
from edgekeeper.errors import (
    AccessDenied,
    DiskFull,
    DrainTimeout,
    FatalError,
    RetryableError,
    TimedOut,
    Unreachable,
    classified,
    classify,
)
from edgekeeper.protocol.envelope import peek_header, seal_event

from cloudkit import enroll_device, make_event, until
from devicekit import Proc, edgekeeper
from fake_anthropic import FakeAnthropic

KEY = "fake-key-runtime-test"


async def fill(data_dir: Path, events: int) -> None:
    """``events`` sealed events from one enrolled device, queued as the ingest would."""
    store = await open_store("sqlite", data_dir)
    queue = await open_queue("sqlite", data_dir)
    try:
        keys = await asyncio.to_thread(CloudKeys.ensure, data_dir)
        device = await enroll_device(store, "pi-porch")
        for seq in range(1, events + 1):
            env = seal_event(make_event("pi-porch", seq), device=device,
                             cloud_box_pk=keys.box_pk, sent_at=time.time(), model_version="m@1")
            await queue.enqueue(QueuedEvent("pi-porch", seq, peek_header(env).payload_hash, env,
                                            time.time()))
    finally:
        await queue.close()
        await store.close()


async def backlog(data_dir: Path) -> tuple[int, int, int, int]:
    """(results stored, ready, leased, dead)."""
    store = await open_store("sqlite", data_dir)
    queue = await open_queue("sqlite", data_dir)
    try:
        s = await queue.stats()
        return await store.results_version(), s.ready, s.leased, s.dead
    finally:
        await queue.close()
        await store.close()


def worker_args(tmp_path: Path, *, concurrency: int, drain: float | None = None) -> list[str]:
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(
        f'[cloud]\ndata_dir = "{tmp_path / "cloud"}"\nreasoner = "anthropic"\n'
        f"worker_concurrency = {concurrency}\n"
        '[reasoner]\ntranscriber = "none"\nmax_retries = 0\n'
        "[budget]\ndevice_daily_usd = 0\nglobal_daily_usd = 0\n")
    drain_args = [] if drain is None else ["--drain-seconds", str(drain)]
    return ["--config", str(cfg), *drain_args, "cloud", "worker"]


@pytest.fixture
async def slow_provider() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY, latency_s=2.0) as fake:
        yield fake


async def in_flight(fake: FakeAnthropic, n: int, proc: Proc) -> None:
    async def asked() -> bool:
        assert proc.proc.returncode is None, "\n".join(proc.lines)
        return len(fake.requests) >= n

    await until(asked, 90)  # a worker's first start imports the SDK: slow on a loaded machine


@pytest.mark.slow
async def test_sigterm_drains_the_events_in_hand_and_exits_0(
    tmp_path: Path, slow_provider: FakeAnthropic
) -> None:
    data = tmp_path / "cloud"
    await fill(data, 6)
    env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": slow_provider.url}
    async with edgekeeper(*worker_args(tmp_path, concurrency=3), env=env) as p:
        await in_flight(slow_provider, 3, p)  # three calls answered only after 2 s
        p.signal(signal.SIGTERM)
        assert await p.exited() == 0, "\n".join(p.lines)
    # The three in hand were answered, stored and acked; nothing more was leased; the other
    # three wait in the queue for the next worker. Nothing lost, nothing half done.
    assert await backlog(data) == (3, 3, 0, 0)
    assert len(slow_provider.requests) == 3
    (draining,) = p.events("runtime.draining")
    assert draining["signal"] == "SIGTERM" and draining["service"] == "worker"
    assert not p.events("runtime.drain_timeout")
    assert not any("Traceback" in line for line in p.lines)


async def test_a_hung_drain_exits_non_zero_at_its_deadline_saying_what_was_in_flight(
    tmp_path: Path,
) -> None:
    data = tmp_path / "cloud"
    await fill(data, 2)
    async with FakeAnthropic(api_key=KEY, latency_s=600.0) as hung:
        env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": hung.url}
        args = worker_args(tmp_path, concurrency=2, drain=1.0)
        async with edgekeeper(*args, env=env) as p:
            await in_flight(hung, 2, p)
            p.signal(signal.SIGTERM)
            code = await p.exited()
    assert code == 1, "\n".join(p.lines)
    (timeout,) = p.events("runtime.drain_timeout")
    busy = "\n".join(map(str, timeout["in_flight"]))  # type: ignore[call-overload]
    # Which events, and what each was doing: waiting on the provider's answer.
    for seq in (1, 2):
        assert f"event pi-porch:{seq}: _guarded > process > _reason > _call_leased" in busy
        assert f"reason pi-porch:{seq}: _outcome > reason > _create (anthropic.py:" in busy
    assert any("edgekeeper: error:" in line and "still draining" in line for line in p.lines)
    # Cut short, not lost: both events are still queued (leased until the lease expires).
    stored, ready, leased, dead = await backlog(data)
    assert (stored, ready + leased, dead) == (0, 2, 0)


async def test_a_second_sigint_leaves_at_once(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    await fill(data, 1)
    async with FakeAnthropic(api_key=KEY, latency_s=600.0) as hung:
        env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": hung.url}
        async with edgekeeper(*worker_args(tmp_path, concurrency=1), env=env) as p:
            await in_flight(hung, 1, p)
            p.signal(signal.SIGINT)
            await p.logged("runtime.draining")
            t0 = time.monotonic()
            p.signal(signal.SIGINT)
            code = await p.exited()
            took = time.monotonic() - t0
    assert code == 130, "\n".join(p.lines)
    assert took < 1.0, f"a second SIGINT took {took:.2f} s to end the worker"
    (forced,) = p.events("runtime.forced_exit")
    assert "event pi-porch:1" in "\n".join(map(str, forced["in_flight"]))  # type: ignore[call-overload]


async def test_a_rejected_api_key_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    await fill(data, 3)
    async with FakeAnthropic(api_key=KEY) as fake:
        env = {"ANTHROPIC_API_KEY": KEY + "-revoked", "ANTHROPIC_BASE_URL": fake.url}
        async with edgekeeper(*worker_args(tmp_path, concurrency=1), env=env) as p:
            code = await p.exited()
        assert [r.status for r in fake.requests] == [401]  # asked once, not retried forever
    assert code == 1
    # One message: the error line, then its fix; and one log line carrying the same fix
    # (docs/operations.md: what journald and a log alert see).
    errors = [i for i, line in enumerate(p.lines) if line.startswith("edgekeeper: error:")]
    assert len(errors) == 1 and "refused the API key" in p.lines[errors[0]]
    assert p.lines[errors[0] + 1].startswith("  fix: check ANTHROPIC_API_KEY")
    (logged,) = p.events("worker.provider_refused")
    assert str(logged["fix"]).startswith("check ANTHROPIC_API_KEY")
    assert KEY not in "\n".join(p.lines)
    assert not any("Traceback" in line for line in p.lines)
    # Not the events' fault: none dead-lettered, none charged an attempt, all still queued.
    assert await backlog(data) == (0, 3, 0, 0)


async def test_sighup_without_a_reload_is_logged_and_ignored(
    tmp_path: Path, slow_provider: FakeAnthropic
) -> None:
    await fill(tmp_path / "cloud", 1)
    env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": slow_provider.url}
    async with edgekeeper(*worker_args(tmp_path, concurrency=1), env=env) as p:
        await in_flight(slow_provider, 1, p)
        p.signal(signal.SIGHUP)
        await p.logged("runtime.sighup_ignored")
        p.signal(signal.SIGTERM)
        assert await p.exited() == 0


async def test_cloud_serve_reloads_on_sighup_and_drains_on_sigterm(tmp_path: Path) -> None:
    env = {"EDGEKEEPER_CLOUD_DATA_DIR": str(tmp_path / "cloud")}
    async with edgekeeper("cloud", "serve", "--port", "0", env=env) as p:
        url = str((await p.logged("ingest.listening"))["url"])
        async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        p.signal(signal.SIGHUP)  # re-read the device registry now
        await p.logged("runtime.reloaded")
        p.signal(signal.SIGTERM)
        assert await p.exited() == 0, "\n".join(p.lines)
    assert p.events("ingest.draining") and not any("Traceback" in line for line in p.lines)


# --- in one process: the sleep, the backoff, the error tree ----------------------------------


async def test_sleep_returns_early_on_stop_or_wake() -> None:
    stop, wake = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().call_soon(wake.set)
    assert await runtime.sleep(stop, 60.0, wake) is False  # woken, not stopping
    asyncio.get_running_loop().call_soon(stop.set)
    assert await runtime.sleep(stop, 60.0) is True
    assert await runtime.sleep(stop, 60.0) is True  # already stopping: no wait at all


async def test_serve_raises_the_service_error_itself_not_a_group() -> None:
    async def main(stop: asyncio.Event) -> None:
        raise FatalError("the key is refused", fix="check ANTHROPIC_API_KEY")

    with pytest.raises(FatalError, match="the key is refused"):
        await runtime.serve(main, name="t")

    async def fine(stop: asyncio.Event) -> int:
        return 7

    assert await runtime.serve(fine, name="t") == 7


def test_one_backoff_resets_on_success() -> None:
    b = Backoff(1.0, 8.0)
    waits = [b.next_delay() for _ in range(6)]
    assert all(0 <= w <= 8.0 for w in waits) and b.failures == 6
    b.reset()
    assert b.ceiling() == 1.0 and b.next_delay(retry_after=3.0) >= 3.0


async def test_errors_are_classified_where_they_enter() -> None:
    # A real refused connection, through aiohttp.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1/events"  # closed again: refused
    async with aiohttp.ClientSession() as session:
        with pytest.raises(Unreachable) as err, classified(f"POST {url}"):
            async with session.post(url):
                pass
    assert isinstance(err.value, RetryableError) and isinstance(err.value, ConnectionError)
    assert url in err.value.message and err.value.fix
    disk = classify(OSError(errno.ENOSPC, "No space left on device"), "outbox")
    assert isinstance(disk, DiskFull) and isinstance(disk, RetryableError)
    denied = classify(PermissionError(errno.EACCES, "Permission denied"), "results.jsonl")
    assert isinstance(denied, AccessDenied) and isinstance(denied, FatalError)
    slow = classify(TimeoutError())
    assert isinstance(slow, TimedOut) and isinstance(slow, TimeoutError)
    assert classify(ValueError("a bug")) is None  # not ours to judge: surfaces as it is


async def test_a_drain_past_its_deadline_names_the_task_and_where_it_waits() -> None:
    async def stuck_upload() -> None:
        await asyncio.Event().wait()  # an upload whose answer never comes

    async def main(stop: asyncio.Event) -> None:
        async with compat.TaskGroup() as tg:
            tg.create_task(stuck_upload(), name="upload seq 7")
            stop.set()  # the service asks to stop itself (`run --seconds`); it cannot drain

    with pytest.raises(DrainTimeout) as err:
        await runtime.serve(main, name="t", drain_seconds=0.2)
    assert "upload seq 7: stuck_upload (test_runtime.py:" in err.value.message
    assert "--drain-seconds" in (err.value.fix or "")
