"""The store contract (cloud/store/base.py), run against every backend in
cloudkit.STORE_BACKENDS: enrollment tokens, registry, revocation, sealed results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from edgekeeper.cloud.backends import open_store
from edgekeeper.cloud.enroll import EnrollRequest, enroll, issue_token, revoke, token_hash
from edgekeeper.cloud.store.base import EnrollOutcome, Store
from edgekeeper.protocol.errors import DeviceExists, InvalidRequest, InvalidToken
from edgekeeper.protocol.keys import DeviceKeys, b64e

from cloudkit import STORE_BACKENDS
from servers import dump_postgres, store_overrides

Opener = Callable[[], Awaitable[Store]]
NOW = 1_790_000_000.0


@pytest.fixture(params=STORE_BACKENDS)
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    opened: list[Store] = []

    async def open_backend() -> Store:
        s = await open_store(request.param, tmp_path / "data",
                             **store_overrides(request, request.param))
        opened.append(s)
        return s

    yield open_backend
    for s in opened:
        await s.close()


def req(token: str, device_id: str, keys: DeviceKeys) -> EnrollRequest:
    return EnrollRequest.from_json({"token": token, "device_id": device_id,
                                    "sign_pk": b64e(keys.sign_pk), "box_pk": b64e(keys.box_pk)})


async def test_token_enrolls_once(make_store: Opener) -> None:
    store = await make_store()
    keys = DeviceKeys.generate()
    token = await issue_token(store, ttl_s=60, now=NOW)
    v0 = await store.registry_version()
    assert await enroll(store, req(token, "pi-1", keys), now=NOW) is EnrollOutcome.ENROLLED
    assert await store.registry_version() != v0
    # The device lost our answer and asks again with the same token and keys: same answer.
    assert await enroll(store, req(token, "pi-1", keys), now=NOW + 1) is EnrollOutcome.REPEATED
    # Anyone else with the used token is refused.
    with pytest.raises(InvalidToken, match="already used"):
        await enroll(store, req(token, "pi-2", DeviceKeys.generate()), now=NOW + 2)
    with pytest.raises(InvalidToken, match="already used"):
        await enroll(store, req(token, "pi-1", DeviceKeys.generate()), now=NOW + 2)
    record = await store.get_device("pi-1")
    assert record is not None and record.public() == keys.public("pi-1")
    assert [d.device_id for d in await store.list_devices()] == ["pi-1"]


async def test_expired_and_unknown_tokens_change_nothing(make_store: Opener) -> None:
    store = await make_store()
    token = await issue_token(store, ttl_s=60, now=NOW)
    with pytest.raises(InvalidToken, match="expired"):
        await enroll(store, req(token, "pi-1", DeviceKeys.generate()), now=NOW + 61)
    with pytest.raises(InvalidToken, match="not known"):
        await enroll(store, req("made-up", "pi-1", DeviceKeys.generate()), now=NOW)
    assert await store.list_devices() == []


async def test_taken_id_is_refused_without_consuming_the_token(make_store: Opener) -> None:
    store = await make_store()
    await enroll(store, req(await issue_token(store, ttl_s=60, now=NOW), "pi-1",
                            DeviceKeys.generate()), now=NOW)
    token = await issue_token(store, ttl_s=60, now=NOW)
    with pytest.raises(DeviceExists):
        await enroll(store, req(token, "pi-1", DeviceKeys.generate()), now=NOW)
    # The refusal left the token unused: it still enrolls another id.
    assert await enroll(store, req(token, "pi-2", DeviceKeys.generate()),
                        now=NOW) is EnrollOutcome.ENROLLED


async def test_revocation(make_store: Opener) -> None:
    store = await make_store()
    keys = DeviceKeys.generate()
    await enroll(store, req(await issue_token(store, ttl_s=60, now=NOW), "pi-1", keys), now=NOW)
    v = await store.registry_version()
    assert await revoke(store, "pi-1", now=NOW + 5)
    assert await store.registry_version() != v
    assert not await revoke(store, "pi-1", now=NOW + 6)  # already
    assert not await revoke(store, "nobody", now=NOW)
    record = await store.get_device("pi-1")
    assert record is not None and record.revoked and record.revoked_at == NOW + 5
    assert record.public().revoked
    # A revoked id stays taken, even for its own keys.
    with pytest.raises(DeviceExists):
        await enroll(store, req(await issue_token(store, ttl_s=60, now=NOW), "pi-1", keys),
                     now=NOW)


def test_enroll_request_validation() -> None:
    keys = DeviceKeys.generate()
    good = {"token": "t", "device_id": "pi-1", "sign_pk": b64e(keys.sign_pk),
            "box_pk": b64e(keys.box_pk)}
    assert EnrollRequest.from_json(good).device_id == "pi-1"
    assert "secret-token" not in repr(EnrollRequest.from_json({**good, "token": "secret-token"}))
    for bad in ([], {**good, "extra": 1}, {**good, "token": ""}, {**good, "device_id": "a b"},
                {**good, "sign_pk": "short"}, {**good, "box_pk": 5}, {"token": "t"}):
        with pytest.raises(InvalidRequest):
            EnrollRequest.from_json(bad)


async def test_tokens_are_stored_hashed(
    make_store: Opener, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = await make_store()
    token = await issue_token(store, ttl_s=60, now=NOW)
    assert len(token) >= 40
    await store.close()
    blob = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("*") if p.is_file())
    if "postgres" in request.node.callspec.params.values():
        blob += dump_postgres(request.getfixturevalue("postgres_dsn"))
    # File backends: the hash is there, the token is not. (A server backend checks its tables.)
    assert token_hash(token) in blob
    assert token.encode() not in blob


async def test_results_cursor_ack_and_isolation(make_store: Opener) -> None:
    store = await make_store()
    v0 = await store.results_version()
    ids = [await store.put_result(device_id="pi-1", seq=s, envelope=b"r%d" % s, now=NOW)
           for s in (1, 2, 3)]
    other = await store.put_result(device_id="pi-2", seq=1, envelope=b"x", now=NOW)
    assert ids == sorted(ids) and other > ids[-1]
    assert await store.results_version() > v0
    # Idempotent on (device, seq): a re-run worker keeps the first result.
    assert await store.put_result(device_id="pi-1", seq=2, envelope=b"again", now=NOW) == ids[1]
    got = await store.results_after("pi-1", 0, 2)
    assert [(r.seq, r.envelope) for r in got] == [(1, b"r1"), (2, b"r2")]
    assert [r.seq for r in await store.results_after("pi-1", got[-1].id, 10)] == [3]
    # Acks count only this device's unacked results.
    assert await store.ack_results("pi-1", [ids[0], ids[1], other, 999_999], now=NOW) == 2
    assert await store.ack_results("pi-1", [ids[0]], now=NOW) == 0
    assert [r.seq for r in await store.results_after("pi-1", 0, 10)] == [3]
    assert [r.seq for r in await store.results_after("pi-2", 0, 10)] == [1]


async def test_store_survives_restart(make_store: Opener) -> None:
    store = await make_store()
    keys = DeviceKeys.generate()
    await enroll(store, req(await issue_token(store, ttl_s=60, now=time.time()), "pi-1", keys),
                 now=time.time())
    rid = await store.put_result(device_id="pi-1", seq=1, envelope=b"e", now=NOW)
    await store.close()
    again = await make_store()
    assert (await again.get_device("pi-1")) is not None
    assert [r.id for r in await again.results_after("pi-1", 0, 10)] == [rid]
    await again.ping()


async def test_cursor_never_skips_a_result_under_concurrent_writers(make_store: Opener) -> None:
    # Two workers (two handles) store results while the device's long-poll advances its cursor:
    # an id that became visible after a larger one would be skipped for good.
    writers = [await make_store(), await make_store()]
    reader = await make_store()
    total = 150
    seen: list[int] = []

    async def write(seq: int) -> None:
        await writers[seq % 2].put_result(device_id="pi-1", seq=seq, envelope=b"r", now=NOW)

    async def read() -> None:
        cursor = 0
        while len(seen) < total:
            rows = await reader.results_after("pi-1", cursor, 40)
            seen.extend(r.seq for r in rows)
            cursor = rows[-1].id if rows else cursor
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(read(), *(write(s) for s in range(total))), 60)
    assert sorted(seen) == list(range(total))


@pytest.mark.postgres
async def test_postgres_unreachable_is_a_clear_config_error() -> None:
    from edgekeeper.errors import ConfigError

    from servers import free_port

    dsn = f"postgresql://edge:hunter2@127.0.0.1:{free_port()}/edgekeeper"
    with pytest.raises(ConfigError) as info:
        await open_store("postgres", Path("."), dsn=dsn, connect_timeout_s=2)
    assert "hunter2" not in str(info.value) and "hunter2" not in (info.value.fix or "")
    assert "postgres_dsn" in (info.value.fix or "")


@pytest.mark.postgres
async def test_postgres_missing_database_says_how_to_create_it(postgres_server: Any) -> None:
    from edgekeeper.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist") as info:
        await open_store("postgres", Path("."), dsn=postgres_server.url("ektest_missing_db"))
    assert "createdb" in (info.value.fix or "")


async def test_usage_running_totals_and_has_result(make_store: Opener) -> None:
    from edgekeeper.cloud.store.base import UsageRecord, UsageRow, UsageTotals

    store = await make_store()

    def call(call_id: str, device: str, seq: int, day: str, cost: float = 0.5) -> UsageRecord:
        return UsageRecord(call_id, device, seq, day, "anthropic:m", "m", 10, 20, 3, 4, cost, NOW)

    assert await store.record_usage(call("c1", "pi-1", 1, "2026-11-23"))
    assert await store.record_usage(call("c2", "pi-1", 1, "2026-11-23"))  # a retry: 2nd call
    assert await store.record_usage(call("c3", "pi-2", 2, "2026-11-23", cost=1.0))
    assert await store.record_usage(call("c4", "pi-1", 3, "2026-11-24"))
    assert not await store.record_usage(call("c1", "pi-1", 1, "2026-11-23"))  # counted once
    assert await store.usage_totals(day="2026-11-23") == UsageTotals(3, 111, 2.0)
    assert await store.usage_totals(day="2026-11-23", device_id="pi-1") == UsageTotals(2, 74, 1.0)
    assert await store.usage_totals(day="2026-11-25") == UsageTotals(0, 0, 0.0)
    assert await store.usage_by_day(since_day="2026-11-23") == [
        UsageRow("2026-11-23", "pi-1", 2, 1, 20, 40, 6, 8, 1.0),
        UsageRow("2026-11-23", "pi-2", 1, 1, 10, 20, 3, 4, 1.0),
        UsageRow("2026-11-24", "pi-1", 1, 1, 10, 20, 3, 4, 0.5),
    ]
    assert [r.day for r in await store.usage_by_day(since_day="2026-11-24",
                                                     device_id="pi-1")] == ["2026-11-24"]
    assert not await store.has_result("pi-1", 1)
    await store.put_result(device_id="pi-1", seq=1, envelope=b"r", now=NOW)
    assert await store.has_result("pi-1", 1) and not await store.has_result("pi-2", 1)


async def test_prune_results_removes_only_old_acked_ones(make_store: Opener) -> None:
    store = await make_store()
    day = 86400.0
    ids = {seq: await store.put_result(device_id="pi-1", seq=seq, envelope=b"r%d" % seq,
                                       now=NOW - 60 * day)
           for seq in (1, 2, 3, 4, 5)}
    other = await store.put_result(device_id="pi-2", seq=1, envelope=b"x", now=NOW - 60 * day)
    # Acked long ago: 1, 2 and pi-2's; acked lately: 3. Never acked (a device offline for
    # two months): 4 and 5, however old.
    assert await store.ack_results("pi-1", [ids[1], ids[2]], now=NOW - 30 * day) == 2
    assert await store.ack_results("pi-2", [other], now=NOW - 20 * day) == 1
    assert await store.ack_results("pi-1", [ids[3]], now=NOW - 1 * day) == 1
    cutoff = NOW - 7 * day
    assert await store.prune_results(acked_before=cutoff, limit=1) == 1  # a batch at a time
    assert await store.prune_results(acked_before=cutoff, limit=100) == 2
    assert await store.prune_results(acked_before=cutoff, limit=100) == 0
    assert not await store.has_result("pi-1", 1) and not await store.has_result("pi-1", 2)
    assert not await store.has_result("pi-2", 1)
    for seq in (3, 4, 5):
        assert await store.has_result("pi-1", seq)
    assert [r.seq for r in await store.results_after("pi-1", 0, 10)] == [4, 5]
    # A device's cursor never sees a pruned id again: new results get larger ids, also
    # after the largest one was pruned.
    assert await store.ack_results("pi-1", [ids[4], ids[5]], now=NOW - 10 * day) == 2
    assert await store.prune_results(acked_before=cutoff, limit=100) == 2  # 3 is recent
    assert await store.has_result("pi-1", 3) and not await store.has_result("pi-1", 5)
    new = await store.put_result(device_id="pi-1", seq=6, envelope=b"r6", now=NOW)
    assert new > max(*ids.values(), other)
    assert [r.seq for r in await store.results_after("pi-1", 0, 10)] == [6]


async def test_prune_results_is_an_indexed_delete(
    make_store: Opener, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # The prune runs every hour against a table of months of results: it must walk the index
    # of acked_at, never scan the table.
    store = await make_store()
    query = "SELECT id FROM results WHERE acked_at < {p} ORDER BY acked_at LIMIT {p}"
    if "postgres" in request.node.callspec.params.values():
        import psycopg

        dsn = request.getfixturevalue("postgres_dsn")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("SET enable_seqscan = off")  # a tiny table would be scanned
            cur = await conn.execute("EXPLAIN " + query.format(p="%s"), (NOW, 100))
            plan = " ".join(str(row[0]) for row in await cur.fetchall())
    else:
        import sqlite3

        await store.close()
        conn = sqlite3.connect(tmp_path / "data" / "store.sqlite")
        try:
            rows = conn.execute("EXPLAIN QUERY PLAN " + query.format(p="?"), (NOW, 100))
            plan = " ".join(str(row[-1]) for row in rows)
        finally:
            conn.close()
    assert "results_acked" in plan, plan
