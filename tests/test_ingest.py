"""The ingest over real HTTP: a real aiohttp server on 127.0.0.1 port 0, real SQLite backends in
tmp_path, devices enrolled through the API. Every refusal must be a 4xx JSON error with its
stable code and leave the queue untouched."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from edgekeeper.cloud.backends import open_store
from edgekeeper.cloud.enroll import revoke
from edgekeeper.cloud.ingest import CRYPTO_THREAD_MIN_BYTES
from edgekeeper.cloud.reasoners.echo import EchoReasoner
from edgekeeper.cloud.worker import Worker
from edgekeeper.metrics import total
from edgekeeper.protocol import envelope as E
from edgekeeper.protocol.keys import DeviceKeys, b64d, b64e
from edgekeeper.protocol.messages import payload_digest

from cloudkit import Cloud, Device, make_event, running_cloud, until

MAX_BYTES = 256 * 1024


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    async with running_cloud(tmp_path, max_event_bytes=MAX_BYTES) as c:
        yield c


@pytest.fixture
async def device(cloud: Cloud) -> Device:
    return await cloud.enroll("pi-kitchen")


async def queue_state(cloud: Cloud) -> tuple[int, int, int, int]:
    s = await cloud.queue.stats()
    return (s.ready, s.leased, s.dead, s.seen)


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"] and isinstance(body["error"]["fix"], str)


# --- events -------------------------------------------------------------------------------


async def test_event_is_queued_once_and_retries_are_duplicates(
    cloud: Cloud, device: Device
) -> None:
    body = make_event(device.device_id, 1, frame_bytes=50_000)
    status, data, _ = await cloud.post_envelope(device.seal(body))
    assert (status, data) == (202, {"status": "queued", "device_id": "pi-kitchen", "seq": 1})
    # The device lost our 202 and retries, sealing again with a fresh sent_at.
    status, data, _ = await cloud.post_envelope(device.seal(body, sent_at=time.time() + 1))
    assert (status, data["status"]) == (200, "duplicate")
    assert await queue_state(cloud) == (1, 0, 0, 1)
    (lease,) = await cloud.queue.lease("t", count=5, visibility_s=60)
    assert E.peek_header(lease.event.envelope).payload_hash == payload_digest(body.encode())


async def test_same_seq_with_other_payload_is_a_conflict(cloud: Cloud, device: Device) -> None:
    await cloud.post_envelope(device.seal(make_event(device.device_id, 5, label="person")))
    before = await queue_state(cloud)
    status, data, _ = await cloud.post_envelope(
        device.seal(make_event(device.device_id, 5, label="alarm"))
    )
    assert_error(status, data, 409, "seq_conflict")
    assert await queue_state(cloud) == before


async def test_many_devices_at_once_each_event_exactly_once(cloud: Cloud) -> None:
    devices = [await cloud.enroll(f"pi-{i}") for i in range(4)]
    envelopes = [d.seal(make_event(d.device_id, s)) for d in devices for s in range(1, 8)]
    results = await asyncio.gather(*(cloud.post_envelope(e) for e in envelopes + envelopes))
    statuses = sorted(r[0] for r in results)
    assert statuses.count(202) == len(envelopes) and statuses.count(200) == len(envelopes)
    assert await queue_state(cloud) == (len(envelopes), 0, 0, len(envelopes))


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x10
    return bytes(out)


BAD_INPUTS = ["truncated", "garbled", "bitflip_header", "bitflip_nonce", "bitflip_box",
              "bitflip_box_large", "invalid_body_large", "empty",
              "appended", "wrong_type", "no_type", "json_instead", "unknown_device", "stale_past",
              "stale_future", "invalid_body", "oversized_length"]


@pytest.mark.parametrize("case", BAD_INPUTS)
async def test_bad_input_is_a_4xx_json_error_and_nothing_is_enqueued(
    cloud: Cloud, device: Device, case: str
) -> None:
    good = device.seal(make_event(device.device_id, 3))
    content_type = E.CONTENT_TYPE
    expected: tuple[int, str]
    if case == "truncated":
        data, expected = good[: len(good) // 2], (400, "malformed_envelope")
    elif case == "garbled":
        data, expected = bytes(reversed(good)), (400, "malformed_envelope")
        if data[0] == 0x95:  # 1 in 256: the last ciphertext byte reads as the array marker
            data = b"\x94" + data[1:]
    elif case == "bitflip_header":
        data, expected = _flip(good, 20), (401, "auth_failed")
    elif case == "bitflip_nonce":
        nonce = msgpack.unpackb(good)[3]
        data, expected = _flip(good, good.index(nonce) + 5), (401, "auth_failed")
    elif case == "bitflip_box":
        data, expected = _flip(good, len(good) - 100), (401, "auth_failed")
    elif case == "bitflip_box_large":  # opened on a crypto thread: same refusal
        # (over ingest.CRYPTO_THREAD_MIN_BYTES, under MAX_BYTES)
        big = device.seal(make_event(device.device_id, 3, frame_bytes=200_000))
        assert CRYPTO_THREAD_MIN_BYTES <= len(big) <= MAX_BYTES
        data, expected = _flip(big, len(big) - 100), (401, "auth_failed")
    elif case == "invalid_body_large":
        header = E._encode_header(device.device_id, 3, time.time(), "m", b"\x00" * 32)
        data = E._seal(E.KIND_EVENT, header, b"\x00" * 200_000, device.keys.box_sk,
                       device.cloud.box_pk)
        assert CRYPTO_THREAD_MIN_BYTES <= len(data) <= MAX_BYTES
        expected = (400, "invalid_body")
    elif case == "empty":
        data, expected = b"", (400, "malformed_envelope")
    elif case == "appended":
        data, expected = good + b"\x01", (400, "malformed_envelope")
    elif case == "wrong_type":
        data, expected, content_type = good, (415, "unsupported_media_type"), "application/json"
    elif case == "no_type":
        data, expected, content_type = good, (415, "unsupported_media_type"), ""
    elif case == "json_instead":
        data, expected = json.dumps({"seq": 3}).encode(), (400, "malformed_envelope")
    elif case == "unknown_device":
        stranger = Device("pi-stranger", DeviceKeys.generate(), device.cloud)
        data, expected = stranger.seal(make_event("pi-stranger", 3)), (401, "unknown_device")
    elif case == "stale_past":
        data = device.seal(make_event(device.device_id, 3), sent_at=time.time() - 3600)
        expected = (401, "stale")
    elif case == "stale_future":
        data = device.seal(make_event(device.device_id, 3), sent_at=time.time() + 3600)
        expected = (401, "stale")
    elif case == "invalid_body":
        header = E._encode_header(device.device_id, 3, time.time(), "m", b"\x00" * 32)
        data = E._seal(E.KIND_EVENT, header, b'{"not": "msgpack"}', device.keys.box_sk,
                       device.cloud.box_pk)
        expected = (400, "invalid_body")
    else:  # oversized_length
        data, expected = b"\x95" + b"\x00" * MAX_BYTES, (413, "payload_too_large")
    before = await queue_state(cloud)
    headers = {"Content-Type": content_type} if content_type else {}
    async with cloud.session.post(f"{cloud.url}/v1/events", data=data,
                                  headers=headers or None,
                                  skip_auto_headers=["Content-Type"]) as resp:
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert_error(resp.status, body, *expected)
    assert await queue_state(cloud) == before == (0, 0, 0, 0)
    # And the real event still goes through afterwards.
    status, _, _ = await cloud.post_envelope(good)
    assert status == 202


async def test_oversized_chunked_body_is_cut_off(cloud: Cloud, device: Device) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BYTES // 16384 + 4):
            yield b"\x00" * 16384

    try:
        status, body, _ = await cloud.post_envelope(chunks())
    except aiohttp.ClientError:
        pass  # the server may close while we still send; either way nothing was queued
    else:
        assert_error(status, body, 413, "payload_too_large")
    assert await queue_state(cloud) == (0, 0, 0, 0)


async def test_upload_bodies_held_in_memory_are_bounded(tmp_path: Path) -> None:
    # max_inflight * max_event_bytes bytes of upload bodies at once: a slow upload holds what
    # it has sent (not a slot: tests/test_ingest_floods.py), and a body that would go over
    # the budget is refused with 503 + Retry-After, nothing queued.
    async with running_cloud(tmp_path, max_inflight=1, max_event_bytes=80_000) as cloud:
        device = await cloud.enroll("pi-1")
        first = device.seal(make_event("pi-1", 1, frame_bytes=60_000))
        release = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield first[:-100]
            await release.wait()
            yield first[-100:]

        slow_upload = asyncio.create_task(cloud.post_envelope(slow()))
        # Wait until the server holds the slow upload (not a timing assertion: a rendezvous).
        for _ in range(500):
            if cloud.server.state.body_bytes == len(first) - 100:
                break
            await asyncio.sleep(0.01)
        second = device.seal(make_event("pi-1", 2, frame_bytes=30_000))
        status, body, headers = await cloud.post_envelope(second)
        assert_error(status, body, 503, "unavailable")
        assert "cloud.max_inflight * cloud.max_event_bytes = 80000" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        assert await queue_state(cloud) == (0, 0, 0, 0)
        release.set()
        status, body, _ = await slow_upload
        assert (status, body["status"]) == (202, "queued")
        assert cloud.server.state.body_bytes == 0  # given back once answered
        status, body, _ = await cloud.post_envelope(second)
        assert (status, body["status"]) == (202, "queued")


async def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    async with running_cloud(tmp_path, rate_per_second=0.01, rate_burst=2) as cloud:
        device = await cloud.enroll("pi-1")
        for seq in (1, 2):
            assert (await cloud.post_envelope(device.seal(make_event("pi-1", seq))))[0] == 202
        status, body, headers = await cloud.post_envelope(device.seal(make_event("pi-1", 3)))
        assert_error(status, body, 429, "rate_limited")
        assert int(headers["Retry-After"]) >= 1
        assert (await cloud.queue.stats()).seen == 2
        # Buckets are per device: another device is not slowed by this one.
        other = await cloud.enroll("pi-2")
        assert (await cloud.post_envelope(other.seal(make_event("pi-2", 1))))[0] == 202


async def test_revoked_device_gets_401_from_then_on(cloud: Cloud, device: Device) -> None:
    assert (await cloud.post_envelope(device.seal(make_event(device.device_id, 1))))[0] == 202
    # Revoke from another "process", as `edgekeeper cloud revoke` does: its own store handle.
    cli_store = await open_store("sqlite", cloud.data_dir)
    try:
        assert await revoke(cli_store, device.device_id, now=time.time())
    finally:
        await cli_store.close()
    # The ingest re-reads the registry every 50 ms in this test (registry_refresh_seconds);
    # uploads racing the revocation may still land, then it must hold for good.
    seq = 2
    for _ in range(400):
        status, body, _ = await cloud.post_envelope(device.seal(make_event(device.device_id, seq)))
        if status == 401:
            break
        seq += 1
        await asyncio.sleep(0.01)
    assert_error(status, body, 401, "device_revoked")
    before = await queue_state(cloud)
    for seq in range(100, 105):
        status, body, _ = await cloud.post_envelope(device.seal(make_event(device.device_id, seq)))
        assert_error(status, body, 401, "device_revoked")
    query = "cursor=0&wait=0&limit=20"
    async with cloud.session.get(f"{cloud.url}/v1/results?{query}",
                                 headers=device.signed("GET", "/v1/results", query)) as resp:
        assert_error(resp.status, await resp.json(), 401, "device_revoked")
    assert await queue_state(cloud) == before


# --- enrollment ---------------------------------------------------------------------------


async def test_enrollment_api(cloud: Cloud) -> None:
    keys = DeviceKeys.generate()
    token = await cloud.token()
    payload = {"token": token, "device_id": "pi-new", "sign_pk": b64e(keys.sign_pk),
               "box_pk": b64e(keys.box_pk)}
    url = f"{cloud.url}/v1/enroll"
    async with cloud.session.post(url, json=payload) as resp:
        assert resp.status == 201
        data = await resp.json()
    assert data["protocol_version"] == 1
    assert b64d(data["cloud"]["box_pk"]) == cloud.keys.box_pk
    assert b64d(data["cloud"]["release_pk"]) == cloud.keys.release_pk
    async with cloud.session.post(url, json=payload) as resp:  # answer lost, asked again
        assert resp.status == 200 and await resp.json() == data
    async with cloud.session.post(url, json={**payload, "device_id": "pi-other"}) as resp:
        assert_error(resp.status, await resp.json(), 401, "invalid_token")
    other_key = b64e(DeviceKeys.generate().sign_pk)
    async with cloud.session.post(url, json={**payload, "token": await cloud.token(),
                                             "sign_pk": other_key}) as resp:
        assert_error(resp.status, await resp.json(), 409, "device_exists")
    async with cloud.session.post(url, data=b"{not json",
                                  headers={"Content-Type": "application/json"}) as resp:
        assert_error(resp.status, await resp.json(), 400, "invalid_json")
    async with cloud.session.post(url, json={"token": token}) as resp:
        assert_error(resp.status, await resp.json(), 400, "invalid_request")
    # JSON that parses to what no client sends: a lone surrogate in the token, and nesting
    # deeper than json's recursion (both were 500s with a traceback in the log)
    for raw, code in ((json.dumps({**payload, "token": "\ud800"}).encode(), "invalid_request"),
                      (b"[" * 3000, "invalid_json")):
        async with cloud.session.post(url, data=raw,
                                      headers={"Content-Type": "application/json"}) as resp:
            assert_error(resp.status, await resp.json(), 400, code)
    async with cloud.session.post(url, data=json.dumps(payload).encode(),
                                  headers={"Content-Type": "text/plain"}) as resp:
        assert_error(resp.status, await resp.json(), 415, "unsupported_media_type")
    async with cloud.session.post(url, json={**payload, "pad": "x" * 10_000}) as resp:
        assert_error(resp.status, await resp.json(), 413, "payload_too_large")
    assert [d.device_id for d in await cloud.store.list_devices()] == ["pi-new"]


# --- results ------------------------------------------------------------------------------


async def get_results(cloud: Cloud, device: Device, cursor: int = 0, wait: int = 0,
                      limit: int = 20) -> tuple[int, Any]:
    query = f"cursor={cursor}&wait={wait}&limit={limit}"
    async with cloud.session.get(f"{cloud.url}/v1/results?{query}",
                                 headers=device.signed("GET", "/v1/results", query)) as resp:
        return resp.status, await resp.json()


async def ack(cloud: Cloud, device: Device, ids: list[int]) -> tuple[int, Any]:
    body = json.dumps({"ids": ids}).encode()
    headers = {**device.signed("POST", "/v1/results/ack", body=body),
               "Content-Type": "application/json"}
    async with cloud.session.post(f"{cloud.url}/v1/results/ack", data=body,
                                  headers=headers) as resp:
        return resp.status, await resp.json()


async def test_long_poll_delivers_the_workers_result_then_ack(cloud: Cloud, device: Device) -> None:
    other = await cloud.enroll("pi-other")
    poll = asyncio.create_task(get_results(cloud, device, wait=20))
    body = make_event(device.device_id, 11)
    assert (await cloud.post_envelope(device.seal(body)))[0] == 202
    assert (await cloud.post_envelope(other.seal(make_event("pi-other", 1))))[0] == 202
    worker = Worker(queue=cloud.queue, store=cloud.store, reasoner=EchoReasoner(),
                    keys=cloud.keys)
    stats = await worker.run(burst=True)
    assert (stats.done, stats.dead) == (2, 0)
    status, data = await poll
    assert status == 200 and len(data["results"]) == 1, data
    (item,) = data["results"]
    assert item["seq"] == 11 and data["cursor"] == item["id"]
    opened = E.open_result(b64d(item["envelope"]), device=device.keys,
                           device_id=device.device_id, cloud_box_pk=device.cloud.box_pk)
    result = opened.body
    assert (result.seq, result.reasoner, result.provisional, result.label) == (
        11, "echo", True, "person")
    assert result.gate_correct is None
    # Until acked, the result is offered again from the start (a restarted device)...
    status, again = await get_results(cloud, device)
    assert [r["id"] for r in again["results"]] == [item["id"]]
    # ...but not past the cursor.
    status, past = await get_results(cloud, device, cursor=data["cursor"])
    assert past == {"results": [], "cursor": data["cursor"]}
    # pi-other cannot ack pi-kitchen's result; pi-kitchen can, once.
    assert await ack(cloud, other, [item["id"]]) == (200, {"acked": 0})
    assert await ack(cloud, device, [item["id"]]) == (200, {"acked": 1})
    assert await ack(cloud, device, [item["id"]]) == (200, {"acked": 0})
    assert (await get_results(cloud, device))[1]["results"] == []
    assert len((await get_results(cloud, other))[1]["results"]) == 1


async def test_long_poll_times_out_empty(cloud: Cloud, device: Device) -> None:
    status, data = await get_results(cloud, device, cursor=5, wait=1)
    assert (status, data) == (200, {"results": [], "cursor": 5})


async def test_results_requests_must_be_signed_fresh_and_valid(
    cloud: Cloud, device: Device
) -> None:
    url = f"{cloud.url}/v1/results?cursor=0&wait=0&limit=20"
    async with cloud.session.get(url) as resp:
        assert_error(resp.status, await resp.json(), 401, "missing_signature")
    wrong_query = device.signed("GET", "/v1/results", "cursor=1&wait=0&limit=20")
    async with cloud.session.get(url, headers=wrong_query) as resp:
        assert_error(resp.status, await resp.json(), 401, "auth_failed")
    old = device.signed("GET", "/v1/results", "cursor=0&wait=0&limit=20",
                        timestamp=time.time() - 3600)
    async with cloud.session.get(url, headers=old) as resp:
        assert_error(resp.status, await resp.json(), 401, "stale")
    status, body = await get_results(cloud, device, limit=1000)
    assert_error(status, body, 400, "invalid_request")
    bad = b"[1, 2"
    headers = {**device.signed("POST", "/v1/results/ack", body=bad),
               "Content-Type": "application/json"}
    async with cloud.session.post(f"{cloud.url}/v1/results/ack", data=bad,
                                  headers=headers) as resp:
        assert_error(resp.status, await resp.json(), 400, "invalid_json")
    assert_error(*(await ack(cloud, device, [])), 400, "invalid_request")
    deep = b"[" * 3000
    headers = {**device.signed("POST", "/v1/results/ack", body=deep),
               "Content-Type": "application/json"}
    async with cloud.session.post(f"{cloud.url}/v1/results/ack", data=deep,
                                  headers=headers) as resp:
        assert_error(resp.status, await resp.json(), 400, "invalid_json")



async def _raw_request(url: str, head: list[bytes], body: Sequence[bytes] = (),
                       pause: float = 0.0) -> tuple[int, Any]:
    """One request written byte for byte (aiohttp's client would refuse non-ASCII headers, and
    cannot pause mid-body): the head, then each body piece with ``pause`` after it. Returns
    the status and JSON body of the answer, read by its Content-Length (aiohttp lingers up to
    10 s for the rest of a body it did not read)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"\r\n".join([*head, b"Connection: close", b"", b""]))
        for piece in body:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(pause)
        await writer.drain()
        header = await reader.readuntil(b"\r\n\r\n")
        length = int(header.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        answer = await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(header.split()[1]), json.loads(answer)


@pytest.mark.parametrize(
    "ts",
    ["\uff11\uff10\uff10\uff10".encode(), b"1000\xa0", b"10\xff00", b"1_000"],
    ids=["fullwidth-digits", "nbsp", "not-utf8", "underscore"],
)
async def test_signature_headers_with_odd_bytes_are_a_401_not_a_500(
    cloud: Cloud, device: Device, ts: bytes
) -> None:
    sig = device.signed("GET", "/v1/results", "cursor=0")[E.HEADER_SIGNATURE].encode()
    status, body = await _raw_request(cloud.url, [
        b"GET /v1/results?cursor=0 HTTP/1.1", b"Host: 127.0.0.1",
        b"X-Edgekeeper-Device: " + device.device_id.encode(),
        b"X-Edgekeeper-Timestamp: " + ts, b"X-Edgekeeper-Signature: " + sig,
    ])
    assert_error(status, body, 401, "missing_signature")



async def test_an_upload_cut_off_mid_body_is_not_a_server_error(
    cloud: Cloud, device: Device
) -> None:
    envelope = device.seal(make_event(device.device_id, 1))
    host, port = cloud.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 + E.CONTENT_TYPE.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(envelope)
                 + envelope[: len(envelope) // 2])
    await writer.drain()
    writer.close()  # the device's link drops half-way
    await writer.wait_closed()
    registry = cloud.server.state.metrics.registry

    async def noticed() -> bool:
        return total(registry, "edgekeeper_ingest_refused_total", {"reason": "client_gone"}) == 1

    await until(noticed)
    assert await queue_state(cloud) == (0, 0, 0, 0)



async def test_requests_aiohttp_cannot_parse_log_one_json_line_without_a_traceback(
    cloud: Cloud,
) -> None:
    """aiohttp answers these 400 itself and logs them at error with a traceback through the
    standard library; the ingest's log must stay JSON lines, and a scanner's junk is INFO."""
    from edgekeeper import log

    stream = io.StringIO()
    log.configure("info", "json", stream=stream)
    try:
        host, port = cloud.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     + E.CONTENT_TYPE.encode()
                     + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
    finally:
        log.configure("warning", "json")
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    junk = [e for e in lines if e.get("logger", "").startswith("aiohttp")]
    assert len(junk) == 1 and junk[0]["level"] == "info", lines
    assert junk[0]["event"].startswith("malformed_http_request") and "exception" not in junk[0]
    assert "chunk size" in junk[0]["event"]


async def test_a_stalled_body_is_a_408_and_frees_its_slot_but_a_slow_one_gets_in(
    tmp_path: Path,
) -> None:
    async with running_cloud(tmp_path, body_timeout_seconds=0.5, max_inflight=1) as cloud:
        device = await cloud.enroll("pi-slow")
        envelope = device.seal(make_event("pi-slow", 1, frame_bytes=60_000))
        head = [b"POST /v1/events HTTP/1.1", b"Host: 127.0.0.1",
                b"Content-Type: " + E.CONTENT_TYPE.encode(),
                b"Content-Length: %d" % len(envelope)]

        # A client that sends a sliver and stops holds the only upload slot until the pause
        # runs out, then gets a 408; nothing is queued.
        status, body = await _raw_request(cloud.url, head, [envelope[:1000]])
        assert_error(status, body, 408, "request_timeout")
        assert f"after 1000 bytes of {len(envelope)}" in body["error"]["message"]
        assert cloud.server.state.inflight == 0 and await queue_state(cloud) == (0, 0, 0, 0)
        # A slow link that keeps sending (pauses shorter than the timeout) gets through.
        step = 16 * 1024
        pieces = [envelope[i:i + step] for i in range(0, len(envelope), step)]
        status, body = await _raw_request(cloud.url, head, pieces, pause=0.3)
        assert status == 202, body
        assert (await queue_state(cloud))[0] == 1


# --- the rest -----------------------------------------------------------------------------


async def test_health_and_unknown_routes_answer_json(cloud: Cloud) -> None:
    async with cloud.session.get(f"{cloud.url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "checks": {"store": "ok", "queue": "ok",
                                                                    "provider": "ok"}}
    async with cloud.session.get(f"{cloud.url}/v1/nope") as resp:
        assert_error(resp.status, await resp.json(), 404, "not_found")
    async with cloud.session.get(f"{cloud.url}/v1/events") as resp:
        assert_error(resp.status, await resp.json(), 405, "method_not_allowed")


async def test_health_reports_a_dead_backend(tmp_path: Path) -> None:
    async with running_cloud(tmp_path) as cloud:
        await cloud.queue.close()  # the queue goes away under the running ingest
        async with cloud.session.get(f"{cloud.url}/healthz") as resp:
            data = await resp.json()
            assert resp.status == 503 and data["status"] == "unavailable"
            assert data["checks"]["store"] == "ok" and data["checks"]["queue"] != "ok"
        device = await cloud.enroll("pi-1")
        status, body, headers = await cloud.post_envelope(device.seal(make_event("pi-1", 1)))
        assert_error(status, body, 503, "unavailable")
        assert "Retry-After" in headers
