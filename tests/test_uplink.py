"""The uploader against a real cloud ingest on 127.0.0.1, through a real TCP proxy that cuts
the network. Nothing of ours is patched; the only fakes are a "captive portal" HTTP server and
the proxy's misbehaviour.

The helpers at the top (``start_cloud``, ``enrolled``, ``capture``) are imported by
test_kill.py and test_results.py too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgekeeper import compat
from edgekeeper import config as config_mod
from edgekeeper.backoff import RETRY_AFTER_MAX_S, Backoff, parse_retry_after
from edgekeeper.cloud import enroll as enroll_mod
from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.ingest import IngestServer, create_app
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.sqlite import SQLiteQueue
from edgekeeper.cloud.store.base import Store
from edgekeeper.config import CloudSection, Config
from edgekeeper.device import identity
from edgekeeper.device.outbox import AsyncOutbox, Outbox, OutboxSink
from edgekeeper.device.results import ResultActions
from edgekeeper.device.uplink import Uplink, UplinkHalted, open_async_outbox, open_outbox
from edgekeeper.protocol.messages import EventBody
from edgekeeper.tls import server_context

from cloudkit import captive_portal, until
from tcp_proxy import TcpProxy

DEVICE = "test-device"

# --- helpers shared with test_kill.py / test_results.py ----------------------------------------


@dataclass
class Cloud:
    url: str
    data_dir: Path
    server: IngestServer
    store: Store
    queue: SQLiteQueue
    keys: CloudKeys

    async def token(self) -> str:
        return await enroll_mod.issue_token(self.store, ttl_s=3600.0, now=time.time())

    async def queued(self) -> list[tuple[str, int]]:
        return await self.queue.keys()

    async def close(self) -> None:
        await self.server.stop()
        await self.queue.close()
        await self.store.close()


async def start_cloud(data_dir: Path, **section: Any) -> Cloud:
    """A real ingest (embedded SQLite queue and store) listening on 127.0.0.1, port 0."""
    sect = CloudSection(data_dir=str(data_dir), port=0, **section)
    store = await open_store("sqlite", data_dir)
    queue = await open_queue("sqlite", data_dir)
    keys = await asyncio.to_thread(CloudKeys.ensure, data_dir)
    server = IngestServer(create_app(sect, data_dir, store=store, queue=queue, keys=keys),
                          ssl_context=server_context(sect.tls_cert_file, sect.tls_key_file))
    url = await server.start()
    assert isinstance(queue, SQLiteQueue)
    return Cloud(url, data_dir, server, store, queue, keys)


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    c = await start_cloud(tmp_path / "cloud")
    yield c
    await c.close()


def device_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A device config with fast timeouts and backoff (so tests need no long sleeps)."""
    data: dict[str, Any] = {
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "device")},
        "uplink": {
            "connect_timeout_seconds": 1.0,
            "read_timeout_seconds": 1.0,
            "backoff_base_seconds": 0.02,
            "backoff_cap_seconds": 0.3,
            "batch": 8,
            "concurrency": 2,
        },
        "results": {"retry_delay_seconds": 0.01},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_mod.build_from_dict(data, source="test")


_opened: list[AsyncOutbox] = []


async def opened_outbox(config: Config) -> AsyncOutbox:
    """An outbox the autouse fixture closes even when the test fails half-way (an unclosed
    SQLite connection is a ResourceWarning that fails whichever test happens to collect it)."""
    outbox = await open_async_outbox(config)
    _opened.append(outbox)
    return outbox


@pytest.fixture(autouse=True)
async def _close_outboxes() -> AsyncIterator[None]:
    yield
    while _opened:
        await _opened.pop().close()


async def enrolled(cloud: Cloud, config: Config) -> identity.Enrollment:
    return await identity.enroll(
        cloud.url, await cloud.token(), device_id=config.device.id,
        state_dir=config.device.state_dir,
    )


def event_body(seq: int, size: int = 2000, label: str = "person", priority: int = 0) -> EventBody:
    frame = b"\xff\xd8" + random.randbytes(size)
    return EventBody(
        device_id=DEVICE,
        seq=seq,
        captured_at=time.time(),
        meta={"label": label, "scores": {label: 0.91}, "models": {"vision": "person@1.0.0"}},
        frames=(frame,),
        priority=priority,
    )


async def capture(sink: OutboxSink, n: int, size: int = 2000) -> list[int]:
    """What the device loop does per event: next_seq() at open, deliver() when complete."""
    seqs = []
    for _ in range(n):
        seq = await sink.next_seq()
        await sink.deliver(event_body(seq, size))
        seqs.append(seq)
    return seqs


def make_uplink(config: Config, outbox: AsyncOutbox, enrollment: identity.Enrollment,
                url: str | None = None, **kw: Any) -> Uplink:
    return Uplink(
        outbox,
        keys=identity.load_keys(config.device.state_dir),
        device_id=config.device.id,
        cloud_url=url or enrollment.cloud_url,
        cloud_box_pk=enrollment.cloud.box_pk,
        section=config.uplink,
        **kw,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




# --- backoff ------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_capped_at_the_cap() -> None:
    b = Backoff(base=1.0, cap=300.0, rng=random.Random(7))
    ceilings = []
    for _ in range(14):
        ceilings.append(b.ceiling())
        b.next_delay()
    assert ceilings == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300, 300]
    # Long outage: every wait is within [0, 300], and they spread over the whole range
    # (full jitter; equal jitter would never go below 150).
    draws = [b.next_delay() for _ in range(4000)]
    assert all(0.0 <= d <= 300.0 for d in draws)
    assert min(draws) < 3.0 and max(draws) > 297.0
    assert 140 < sum(draws) / len(draws) < 160
    b.reset()
    assert all(b.next_delay() <= 1.0 for _ in range(1)) and b.ceiling() == 2.0
    # No overflow after a very long outage.
    b.failures = 10_000
    assert b.ceiling() == 300.0


def test_retry_after_is_a_floor_and_is_bounded() -> None:
    b = Backoff(base=0.01, cap=0.02, rng=random.Random(1))
    assert all(b.next_delay(retry_after=7.0) == 7.0 for _ in range(50))
    assert b.next_delay(retry_after=10**9) == RETRY_AFTER_MAX_S


def test_parse_retry_after() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("5", now) == 5.0
    assert parse_retry_after(" 0.25 ", now) == 0.25
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after("999999", now) == RETRY_AFTER_MAX_S
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 42))
    assert parse_retry_after(date, now) == pytest.approx(42.0)
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("nan", now) is None
    assert parse_retry_after(None, now) is None


# --- against the real ingest --------------------------------------------------------------------


async def test_burst_delivers_in_order_and_deletes_only_after_2xx(
    cloud: Cloud, tmp_path: Path
) -> None:
    config = device_config(tmp_path, uplink={"concurrency": 1})
    enrollment = await enrolled(cloud, config)
    outbox = await opened_outbox(config)
    seqs = await capture(OutboxSink(outbox), 25)
    async with make_uplink(config, outbox, enrollment) as up:
        report = await up.run_burst()
    assert (report.delivered, report.duplicates, report.dead, report.remaining) == (25, 0, 0, 0)
    assert await cloud.queued() == [(DEVICE, s) for s in seqs]  # in order, exactly once
    st = await outbox.stats()
    assert st.pending == 0 and st.delivered_total == 25 and st.last_upload_at is not None
    await outbox.close()


async def test_lost_answer_retry_is_a_duplicate_and_reused_seq_a_dead_letter(
    cloud: Cloud, tmp_path: Path
) -> None:
    config = device_config(tmp_path)
    enrollment = await enrolled(cloud, config)
    outbox = await opened_outbox(config)
    sink = OutboxSink(outbox)
    seq = await sink.next_seq()
    body = event_body(seq)
    await sink.deliver(body)
    async with make_uplink(config, outbox, enrollment) as up:
        assert (await up.run_burst()).delivered == 1
        # The device crashed after the cloud's 202 but before its delete: the same event is
        # still in the outbox. Sending it again is harmless.
        await outbox.put(body.encode(), seq, 0, "person@1.0.0")
        report = await up.run_burst()
        assert (report.delivered, report.duplicates, report.remaining) == (0, 1, 0)
        # A restored backup reused the seq for another event: refused for good, kept visible.
        await outbox.put(event_body(seq).encode(), seq, 0, "person@1.0.0")
        report = await up.run_burst()
        assert (report.dead, report.remaining) == (1, 0)
    assert await cloud.queued() == [(DEVICE, seq)]
    dead = await asyncio.to_thread(outbox.sync.dead_letters)
    assert len(dead) == 1 and dead[0][1] is not None and dead[0][1].startswith("seq_conflict")
    await outbox.close()


async def test_network_cut_blackhole_and_reset_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    """Capture keeps going while the link goes through every kind of failure; afterwards the
    queue holds every event exactly once, in capture order."""
    # A generous rate limit: this test is about the network, not about 429s.
    cloud = await start_cloud(tmp_path / "cloud", rate_per_second=1000.0, rate_burst=1000)
    port = int(cloud.url.rsplit(":", 1)[1])
    config = device_config(
        tmp_path,
        uplink={"concurrency": 1, "batch": 4, "read_timeout_seconds": 0.4,
                "connect_timeout_seconds": 0.4},
    )
    enrollment = await enrolled(cloud, config)
    outbox = await opened_outbox(config)
    sink = OutboxSink(outbox)
    captured: list[int] = []
    rng = random.Random(1234)

    async with TcpProxy("127.0.0.1", port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        stop = asyncio.Event()

        async def producer() -> None:
            for _ in range(60):
                captured.extend(await capture(sink, 1, size=rng.randint(500, 30_000)))
                await asyncio.sleep(rng.uniform(0.0, 0.05))

        async def saboteur() -> None:
            for mode in ("blackhole", "pass", "lose_replies", "pass", "reset", "pass", "cut",
                         "lose_replies", "blackhole", "pass", "reset", "cut", "pass"):
                if mode == "cut":
                    proxy.cut()
                else:
                    proxy.mode = mode  # type: ignore[assignment]
                await asyncio.sleep(rng.uniform(0.3, 0.8))
            proxy.mode = "pass"

        async with make_uplink(config, outbox, enrollment, url=url) as up:
            async with compat.TaskGroup() as tg:
                runner = tg.create_task(up.run(stop))
                await asyncio.gather(producer(), saboteur())

                async def drained() -> bool:
                    return (await outbox.stats()).pending == 0

                try:
                    await until(drained, timeout=40)
                except TimeoutError:
                    raise AssertionError(
                        f"not drained: {await outbox.stats()} {up.stats} "
                        f"proxy open={proxy.open_connections} mode={proxy.mode}"
                    ) from None
                finally:
                    stop.set()
            assert runner.done()
            codes = {code for code, _, _ in up.stats.waits}
    try:
        assert len(captured) == 60
        queued = await cloud.queued()
        assert queued == [(DEVICE, s) for s in captured], "lost, duplicated or reordered"
        # The test really broke the link: uploads failed and were retried, connections were
        # reset, and replies were lost after the cloud had queued (answered as duplicates).
        assert up.stats.failures > 0 and "network" in codes
        assert proxy.resets > 0
        assert up.stats.duplicates > 0
        assert up.stats.delivered + up.stats.duplicates == 60
    finally:
        await outbox.close()
        await cloud.close()


async def test_retry_after_from_the_rate_limit_is_honoured(tmp_path: Path) -> None:
    cloud = await start_cloud(tmp_path / "cloud", rate_per_second=4.0, rate_burst=1)
    try:
        config = device_config(tmp_path, uplink={"concurrency": 1})
        enrollment = await enrolled(cloud, config)
        outbox = await opened_outbox(config)
        seqs = await capture(OutboxSink(outbox), 4)
        async with make_uplink(config, outbox, enrollment) as up:
            report = await up.run_burst()
        assert report.remaining == 0 and await cloud.queued() == [(DEVICE, s) for s in seqs]
        limited = [(delay, ra) for code, delay, ra in up.stats.waits if code == "rate_limited"]
        assert limited, "the rate limit never answered 429"
        for delay, retry_after in limited:
            assert retry_after is not None and retry_after > 0
            assert delay >= retry_after  # never sooner than the cloud asked
        await outbox.close()
    finally:
        await cloud.close()


async def test_revoked_device_halts_and_keeps_its_events(cloud: Cloud, tmp_path: Path) -> None:
    config = device_config(tmp_path)
    enrollment = await enrolled(cloud, config)
    outbox = await opened_outbox(config)
    await capture(OutboxSink(outbox), 3)
    assert await cloud.store.revoke(DEVICE, now=time.time())
    await until(lambda: _revoked_seen(cloud))
    async with make_uplink(config, outbox, enrollment) as up:
        with pytest.raises(UplinkHalted, match="device_revoked") as err:
            await up.run_burst()
    assert err.value.fix and "revoked" in err.value.fix
    assert (await outbox.stats()).pending == 3  # nothing lost
    assert await cloud.queued() == []
    await outbox.close()


async def _revoked_seen(cloud: Cloud) -> bool:
    dev = await cloud.server.state.registry.get(DEVICE)
    return dev is not None and dev.revoked


async def test_skewed_device_clock_is_corrected_from_the_cloud_date(
    cloud: Cloud, tmp_path: Path
) -> None:
    config = device_config(tmp_path)
    enrollment = await enrolled(cloud, config)
    outbox = await opened_outbox(config)
    seqs = await capture(OutboxSink(outbox), 3)
    # The board's RTC is an hour behind (no NTP yet): the cloud's window is ±300 s.
    async with make_uplink(config, outbox, enrollment,
                           clock=lambda: time.time() - 3600.0) as up:
        report = await up.run_burst()
        assert report.remaining == 0
        assert up.clock_offset == pytest.approx(3600.0, abs=3.0)
        assert ("stale", 0.0, 0.0) in up.stats.waits
    assert await cloud.queued() == [(DEVICE, s) for s in seqs]
    await outbox.close()


async def test_a_2xx_that_is_not_the_ingest_deletes_nothing(cloud: Cloud, tmp_path: Path) -> None:
    """A captive portal answers 200 with HTML: deleting on it would lose the events."""
    async with captive_portal() as (portal_url, _):
        config = device_config(tmp_path)
        enrollment = await enrolled(cloud, config)
        outbox = await opened_outbox(config)
        await capture(OutboxSink(outbox), 3)
        async with make_uplink(config, outbox, enrollment, url=portal_url) as up:
            report = await up.run_burst(give_up_after=0.5)
        assert report.remaining == 3 and report.delivered == 0
        assert report.last_error is not None and "unexpected_answer" in report.last_error
        await outbox.close()


async def test_edge_fallback_acts_once_per_event_while_the_cloud_is_down(
    cloud: Cloud, tmp_path: Path
) -> None:
    config = device_config(
        tmp_path, uplink={"edge_fallback": True, "edge_fallback_after_seconds": 0.0}
    )
    enrollment = await enrolled(cloud, config)
    outbox = await opened_outbox(config)
    seqs = await capture(OutboxSink(outbox), 3)
    actions = ResultActions.from_config(config)
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    async with make_uplink(config, outbox, enrollment, url=dead_url,
                           on_provisional=actions.handle_provisional) as up:
        report = await up.run_burst(give_up_after=0.5)
    assert report.remaining == 3 and up.stats.rounds > 1  # several failed rounds ...
    lines = (config.device.state_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3  # ... but one provisional result per event
    import json

    docs = [json.loads(line) for line in lines]
    assert [d["seq"] for d in docs] == seqs
    assert all(d["provisional"] and d["reasoner"] == "edge-gate" and d["label"] == "person"
               and d["confidence"] == 0.91 for d in docs)
    # The link comes back: the events still go to the cloud.
    async with make_uplink(config, outbox, enrollment) as up:
        assert (await up.run_burst()).delivered == 3
    assert await cloud.queued() == [(DEVICE, s) for s in seqs]
    await actions.close()
    await outbox.close()


async def test_enroll_errors_are_clear(cloud: Cloud, tmp_path: Path) -> None:
    config = device_config(tmp_path)
    token = await cloud.token()
    e = await identity.enroll(cloud.url, token, device_id=DEVICE,
                              state_dir=config.device.state_dir)
    assert e.cloud.box_pk == cloud.keys.box_pk  # pinned the real cloud key
    # Lost answer: the same token, id and keys again is fine.
    again = await identity.enroll(cloud.url, token, device_id=DEVICE,
                                  state_dir=config.device.state_dir)
    assert again.cloud == e.cloud
    # The same token for another device is refused, with the cloud's code and fix.
    with pytest.raises(identity.EnrollmentError, match="invalid_token") as err:
        await identity.enroll(cloud.url, token, device_id="other",
                              state_dir=tmp_path / "other")
    assert err.value.code == "invalid_token" and err.value.fix
    with pytest.raises(identity.CloudUnreachable):
        await identity.enroll(f"http://127.0.0.1:{free_port()}", token, device_id="x",
                              state_dir=tmp_path / "x", timeout=2.0)
    # The pin is private and belongs to this device id.
    path = config.device.state_dir / "enrollment.json"
    assert path.stat().st_mode & 0o777 == 0o600
    from edgekeeper.errors import ConfigError

    with pytest.raises(ConfigError, match="enrolled as device"):
        await asyncio.to_thread(identity.load_enrollment, config.device.state_dir,
                                "someone-else")


async def test_uplink_run_waits_for_new_events_and_stops_cleanly(
    cloud: Cloud, tmp_path: Path
) -> None:
    config = device_config(tmp_path)
    enrollment = await enrolled(cloud, config)
    outbox = await opened_outbox(config)
    sink = OutboxSink(outbox)
    stop = asyncio.Event()
    async with make_uplink(config, outbox, enrollment) as up:
        task = asyncio.create_task(up.run(stop))
        seqs = []
        for _ in range(3):
            seqs += await capture(sink, 2)

            async def sent(n: int = len(seqs)) -> bool:
                return len(await cloud.queued()) == n

            await until(sent)  # woken by the commit, not by polling
        stop.set()
        await task
    assert await cloud.queued() == [(DEVICE, s) for s in seqs]
    await outbox.close()


def test_outbox_for_the_wrong_device_is_refused_by_config(tmp_path: Path) -> None:
    config = device_config(tmp_path)
    Outbox(config.outbox_path, device_id="someone-else").close()
    from edgekeeper.device.outbox import OutboxError

    with contextlib.suppress(Exception), pytest.raises(OutboxError):
        open_outbox(config)


async def test_cli_keys_enroll_status_and_clear_errors(cloud: Cloud, tmp_path: Path) -> None:
    """The `device` commands as a user runs them (a real process, the real ingest)."""
    import json
    import sys

    cfg = tmp_path / "device.toml"
    cfg.write_text(f'[device]\nid = "{DEVICE}"\nstate_dir = "{tmp_path / "dev"}"\n'
                   '[log]\nlevel = "warning"\n')

    async def run(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgekeeper.cli", "--config", str(cfg), "device", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    rc, out, _ = await run("keys")
    assert rc == 0 and "created now" in out and "sign_pk:" in out
    rc, out2, _ = await run("keys")  # idempotent: the same keys, never regenerated
    assert rc == 0 and "existing" in out2
    assert out.splitlines()[2:] == out2.splitlines()[2:]
    rc, out, err = await run("upload", "--burst")
    assert rc == 2 and "not enrolled" in err and "fix:" in err and "Traceback" not in err
    rc, out, err = await run("enroll", "--cloud", "ftp://nope", "--token", "x")
    assert rc == 2 and "http://" in err and "Traceback" not in err
    rc, out, err = await run("enroll", "--cloud", cloud.url, "--token", "not-a-token")
    assert rc == 1 and "invalid_token" in err and "fix:" in err and "Traceback" not in err
    token = await cloud.token()
    rc, out, err = await run("enroll", "--cloud", cloud.url, "--token", "-",
                             stdin=token.encode() + b"\n")
    assert rc == 0, err
    assert f"enrolled {DEVICE} with {cloud.url}" in out
    assert token not in out + err  # the secret is never echoed
    rc, out, _ = await run("status", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["enrolled"]["cloud_url"] == cloud.url and doc["pending"] == 0
    rc, out, _ = await run("status")
    assert rc == 0 and "last upload:   never" in out and "disk free:" in out
    # A quota the disk cannot hold is pointed out (the quota only bounds the outbox).
    import shutil

    assert doc["disk_free_bytes"] == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.05)
    cfg.write_text(cfg.read_text() + '[outbox]\nquota_mb = 1000000\n')
    short = shutil.disk_usage(tmp_path).free < 1_000_000 * 1024 * 1024
    rc, out, _ = await run("status")
    assert rc == 0 and ("warning: the disk has less free space" in out) == short
    rc, out, _ = await run("status", "--json")
    assert json.loads(out)["disk_short"] == short
