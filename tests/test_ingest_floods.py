"""Cheap floods against the real ingest on 127.0.0.1: uploads under an unknown device id must
not cost a store read each (negative lookups are cached: bounded, short-lived, dropped on
enrollment), one signed long-poll replayed inside the freshness window must not hold more
than ``cloud.results_max_polls_per_device`` sockets (the rest get 429 with Retry-After) nor
keep the device's own newer poll out, and clients trickling upload bodies must not hold the
upload slots (``cloud.max_inflight``) an honest device needs. bench/bench_floods.py measures
the honest device's delivery time under each flood."""

from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path
from typing import Any

import pytest

from edgekeeper.cloud.backends import open_store
from edgekeeper.cloud.ingest import Registry
from edgekeeper.config import CloudSection
from edgekeeper.metrics import total
from edgekeeper.protocol.envelope import CONTENT_TYPE
from edgekeeper.protocol.keys import DeviceKeys

from cloudkit import Device, enroll_device, make_event, running_cloud, until


async def test_a_flood_under_an_unknown_id_costs_one_store_read(tmp_path: Path) -> None:
    # No background refresh during the flood: every store read counted is the flood's.
    async with running_cloud(tmp_path, registry_refresh_seconds=3600.0) as cloud:
        registry = cloud.server.state.registry
        keys = DeviceKeys.generate()
        ghost = Device("pi-ghost", keys, cloud.keys.public())
        envelopes = [ghost.seal(make_event("pi-ghost", seq)) for seq in range(1, 301)]
        before = registry.store_reads
        answers = []
        for wave in range(0, len(envelopes), 50):  # 50 at once: within max_inflight (64)
            answers += await asyncio.gather(
                *(cloud.post_envelope(e) for e in envelopes[wave:wave + 50]))
        assert {(status, body["error"]["code"]) for status, body, _ in answers} == {
            (401, "unknown_device")}
        assert registry.store_reads - before == 1  # one read, however many came at once
        # The same device enrolls through this ingest: its next upload is taken at once.
        await cloud.enroll("pi-ghost", keys)
        status, body, _ = await cloud.post_envelope(ghost.seal(make_event("pi-ghost", 1)))
        assert status == 202, body


async def test_an_enrollment_through_another_process_clears_the_miss(tmp_path: Path) -> None:
    async with running_cloud(tmp_path) as cloud:  # registry_refresh_seconds=0.05
        keys = DeviceKeys.generate()
        late = Device("pi-late", keys, cloud.keys.public())
        status, body, _ = await cloud.post_envelope(late.seal(make_event("pi-late", 1)))
        assert (status, body["error"]["code"]) == (401, "unknown_device")
        # Enrolled straight into the store, as another ingest process or the CLI would.
        keys = await enroll_device(cloud.store, "pi-late")
        late = Device("pi-late", keys, cloud.keys.public())

        async def accepted() -> bool:
            status, _, _ = await cloud.post_envelope(late.seal(make_event("pi-late", 1)))
            return status == 202

        await until(accepted)  # the registry refresh sees the new version and forgets the miss


async def test_negative_cache_is_bounded_and_expires(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path, section=CloudSection())
    now = [1000.0]
    try:
        registry = Registry(store, 3600.0, clock=lambda: now[0], negative_ttl_s=2.0,
                            negative_max=3)
        await registry.load()
        for i in range(5):
            assert await registry.get(f"ghost-{i}") is None
        assert registry.store_reads == 5
        assert await registry.get("ghost-4") is None  # remembered
        assert registry.store_reads == 5
        assert await registry.get("ghost-0") is None  # the oldest was let go: read again
        assert registry.store_reads == 6
        now[0] += 2.5  # past the TTL: read again (an enrollment the refresh has not seen yet)
        assert await registry.get("ghost-4") is None
        assert registry.store_reads == 7
        await enroll_device(store, "ghost-4")
        now[0] += 2.5
        assert await registry.get("ghost-4") is not None
    finally:
        await store.close()


async def test_a_replayed_long_poll_holds_at_most_the_cap(tmp_path: Path) -> None:
    async with running_cloud(tmp_path, results_max_wait_seconds=30.0,
                             results_max_polls_per_device=2) as cloud:
        device = await cloud.enroll("pi-poll")
        query = "cursor=0&wait=30&limit=20"
        headers = device.signed("GET", "/v1/results", query)  # signed once, replayed below
        url = f"{cloud.url}/v1/results?{query}"

        async def poll() -> tuple[int, Any, str | None]:
            async with cloud.session.get(url, headers=headers) as resp:
                return resp.status, await resp.json(), resp.headers.get("Retry-After")

        state = cloud.server.state
        held = [asyncio.create_task(poll()) for _ in range(2)]
        await until(lambda: _async(len(state.polls.get("pi-poll", ())) == 2))
        refused = await asyncio.gather(*(poll() for _ in range(50)))
        for status, body, retry_after in refused:
            assert status == 429 and body["error"]["code"] == "rate_limited", body
            assert "results_max_polls_per_device" in body["error"]["message"]
            assert retry_after is not None and 1 <= int(retry_after) <= 30
        assert not any(t.done() for t in held)
        # a poll that does not wait is never refused
        quick = "cursor=0&wait=0&limit=20"
        async with cloud.session.get(f"{cloud.url}/v1/results?{quick}",
                                     headers=device.signed("GET", "/v1/results", quick)) as r:
            assert r.status == 200
        # A result ends the held polls; the cap frees up with them.
        await cloud.store.put_result(device_id="pi-poll", seq=1, envelope=b"sealed",
                                     now=state.clock())
        for status, body, _ in await asyncio.gather(*held):
            assert status == 200 and len(body["results"]) == 1
        assert "pi-poll" not in state.polls
        status, body, _ = await poll()
        assert status == 200 and len(body["results"]) == 1


async def test_the_devices_own_newer_poll_takes_a_replayed_copys_place(tmp_path: Path) -> None:
    # Copies of one captured long-poll fill the cap; the device's next poll (signed later, as
    # every poll of its own is) must still be held, or its results wait for the copies'
    # deadlines (bench_floods flood b measured 22 s for a result that took 0.45 s).
    async with running_cloud(tmp_path, results_max_wait_seconds=30.0,
                             results_max_polls_per_device=2) as cloud:
        device = await cloud.enroll("pi-poll")
        query = "cursor=0&wait=30&limit=20"
        captured = device.signed("GET", "/v1/results", query, timestamp=time.time() - 5)
        url = f"{cloud.url}/v1/results?{query}"

        async def poll(headers: dict[str, str]) -> tuple[int, Any]:
            async with cloud.session.get(url, headers=headers) as resp:
                return resp.status, await resp.json()

        state = cloud.server.state
        copies = [asyncio.create_task(poll(captured)) for _ in range(2)]
        await until(lambda: _async(len(state.polls.get("pi-poll", ())) == 2))
        own = asyncio.create_task(poll(device.signed("GET", "/v1/results", query)))
        # One copy is answered at once, empty (its place taken); the other is still held.
        done, _ = await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
        assert [t.result() for t in done] == [(200, {"results": [], "cursor": 0})]
        assert len(state.polls["pi-poll"]) == 2 and not own.done()
        # More copies cannot push the device's own poll out: none is newer than it.
        for status, body in await asyncio.gather(*(poll(captured) for _ in range(20))):
            assert status == 429 and body["error"]["code"] == "rate_limited", body
        assert not own.done()
        await cloud.store.put_result(device_id="pi-poll", seq=1, envelope=b"sealed",
                                     now=state.clock())
        status, body = await own
        assert status == 200 and [r["seq"] for r in body["results"]] == [1]
        await asyncio.gather(*copies)
        assert "pi-poll" not in state.polls
        assert total(state.metrics.registry, "edgekeeper_ingest_results_polls_open") == 0


async def test_clients_trickling_bodies_hold_no_upload_slot(tmp_path: Path) -> None:
    # More slow clients than upload slots, each inside body_timeout_seconds between bytes:
    # before the fix they held every slot and the honest upload got 503 for as long as they
    # kept trickling (bench_floods flood c: no event in for 20 s).
    async with running_cloud(tmp_path, max_inflight=2, body_timeout_seconds=30.0) as cloud:
        device = await cloud.enroll("pi-honest")
        host, port = cloud.url.removeprefix("http://").split(":")
        head = (f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nContent-Type: {CONTENT_TYPE}"
                "\r\nContent-Length: 60000\r\n\r\n").encode()
        slow = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
        try:
            for _, writer in slow:
                writer.write(head + b"x" * 100)
                await writer.drain()
            state = cloud.server.state
            # a rendezvous, not a timing: the server has read every slow client's 100 bytes
            await until(lambda: _async(state.body_bytes == 300))
            status, body, _ = await cloud.post_envelope(device.seal(make_event("pi-honest", 1)))
            assert (status, body.get("status")) == (202, "queued"), body
            assert state.inflight == 0  # the slow ones hold bytes, not slots
        finally:
            for _, writer in slow:
                writer.close()
        await until(lambda: _async(cloud.server.state.body_bytes == 0))  # given back


async def _async(value: bool) -> bool:
    return value


async def test_a_gzip_bomb_is_cut_off_at_the_event_limit(tmp_path: Path) -> None:
    # aiohttp inflates a Content-Encoding: gzip body as it is read; the ingest's cap counts the
    # inflated bytes, so 64 KB that inflate to 64 MiB cost at most max_event_bytes of memory.
    async with running_cloud(tmp_path, max_event_bytes=1024 * 1024) as cloud:
        device = await cloud.enroll("pi-gz")
        bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), 9)
        assert len(bomb) < 100_000
        status, body, _ = await cloud.post_envelope(bomb, headers={"Content-Encoding": "gzip"})
        assert (status, body["error"]["code"]) == (413, "payload_too_large"), body
        assert cloud.server.state.body_bytes == 0
        assert (await cloud.queue.stats()).ready == 0
        # an honest envelope sent gzipped is inflated and taken
        status, body, _ = await cloud.post_envelope(
            gzip.compress(device.seal(make_event("pi-gz", 1))),
            headers={"Content-Encoding": "gzip"})
        assert (status, body["status"]) == (202, "queued")


@pytest.mark.parametrize("bomb", [
    b"\xdd\xff\xff\xff\xff" + b"\xc0" * 16,  # an array claiming 4 billion items
    b"\xdf\xff\xff\xff\xff" + b"\xc0" * 16,  # a map claiming 4 billion pairs
    b"\x95\x01\x01\xc6\xff\xff\xff\xff" + b"x" * 16,  # a header claiming 4 GiB of bytes
    b"\x91" * 200_000,  # arrays nested 200 000 deep
], ids=["array32", "map32", "bin32", "nested"])
async def test_msgpack_bombs_are_a_400_not_a_500(tmp_path: Path, bomb: bytes) -> None:
    # Small bodies whose msgpack declares far more than they hold: the parser's limits refuse
    # them before allocating, as a protocol error (never a 500, an exception or a slot held).
    async with running_cloud(tmp_path) as cloud:
        status, body, _ = await cloud.post_envelope(bomb)
        assert (status, body["error"]["code"]) == (400, "malformed_envelope"), body
        assert cloud.server.state.body_bytes == 0 and cloud.server.state.inflight == 0
