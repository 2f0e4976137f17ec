"""What the cloud operator reads: the summary stored with each sealed result (sealed to the
operator key, opened here with it; tests/test_operator.py steals the database), the
devices' activity and the provider's state, on both store backends (SQLite, and a real
PostgreSQL from tests/servers.py), then `edgekeeper cloud results` and `cloud devices` after
real uploads through a real ingest and a real worker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from edgekeeper.cloud.backends import open_store
from edgekeeper.cloud.enroll import revoke
from edgekeeper.cloud.keys import CloudKeys, create_operator_key, open_summary, seal_summary
from edgekeeper.cloud.store.base import ProviderState, ResultSummary, SealedSummary, Store
from edgekeeper.errors import InputError

from cloudkit import cli, cloud_on, enroll_device, make_event, reason_queued
from servers import store_overrides

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
T0 = 1_780_000_000.0  # a fixed time: 2026-05-28
OPERATOR = PrivateKey.generate()


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(request.param, tmp_path, **store_overrides(request, request.param))
    yield s
    await s.close()


def summary(device: str, seq: int, *, label: str = "person", at: float = T0,
            reasoner: str = "anthropic:claude-sonnet-4-6") -> ResultSummary:
    return ResultSummary(device_id=device, seq=seq, label=label, confidence=0.5 + seq / 100,
                         summary=f"{label} at the door ({seq})", action="notify",
                         reasoner=reasoner, provisional=reasoner.startswith("offline"),
                         produced_at=at, received_at=at - 2.0)


def sealed(device: str, seq: int, **kw: Any) -> SealedSummary:
    return seal_summary(summary(device, seq, **kw), bytes(OPERATOR.public_key))


def opened(row: SealedSummary | None) -> ResultSummary:
    assert row is not None
    return open_summary(row, OPERATOR)


async def test_summaries_are_stored_with_their_result_and_outlive_its_pruning(
    store: Store,
) -> None:
    await enroll_device(store, "pi-a")
    await enroll_device(store, "pi-b")
    await enroll_device(store, "pi-idle")
    for seq, at in ((1, T0), (2, T0 + 60), (3, T0 + 120)):
        await store.put_result(device_id="pi-a", seq=seq, envelope=b"sealed", now=at,
                               summary=sealed("pi-a", seq, at=at))
    await store.put_result(device_id="pi-b", seq=7, envelope=b"sealed", now=T0 + 30,
                           summary=sealed("pi-b", 7, label="alarm", at=T0 + 30,
                                           reasoner="offline:hog+haar"))
    # A redelivered event's second result is not stored, and neither is its summary.
    await store.put_result(device_id="pi-a", seq=3, envelope=b"other", now=T0 + 500,
                           summary=sealed("pi-a", 3, label="cat", at=T0 + 500))
    # A result stored without a summary (a caller that has none) is still a result.
    await store.put_result(device_id="pi-b", seq=8, envelope=b"sealed", now=T0 + 40)

    every = await store.result_summaries()
    assert [(r.device_id, r.seq) for r in every] == [("pi-a", 1), ("pi-b", 7), ("pi-a", 2),
                                                     ("pi-a", 3)]
    assert opened(every[-1]) == summary("pi-a", 3, at=T0 + 120)  # the first one kept, every field
    assert opened(every[1]).provisional and opened(every[1]).label == "alarm"
    assert [r.seq for r in await store.result_summaries(device_id="pi-a")] == [1, 2, 3]
    assert [r.seq for r in await store.result_summaries(since=T0 + 30)] == [7, 2, 3]
    assert [r.seq for r in await store.result_summaries(limit=2)] == [2, 3]  # the latest two
    assert await store.result_summaries(device_id="pi-none") == []

    await revoke(store, "pi-b", now=T0 + 1000)
    activity = {a.device.device_id: a for a in await store.device_activity()}
    assert list(activity) == ["pi-a", "pi-b", "pi-idle"]
    a, b, idle = activity["pi-a"], activity["pi-b"], activity["pi-idle"]
    assert (a.events, a.last_seen, a.device.revoked) == (3, T0 + 118, False)
    assert opened(a.last_result) == summary("pi-a", 3, at=T0 + 120)
    assert (b.events, b.last_seen, b.device.revoked_at) == (1, T0 + 28, T0 + 1000)
    assert opened(b.last_result).label == "alarm"
    assert (idle.events, idle.last_seen, idle.last_result) == (0, None, None)

    # Acked results are pruned after their retention; what was concluded stays readable.
    rows = await store.results_after("pi-a", 0, 10)
    assert await store.ack_results("pi-a", [r.id for r in rows], now=T0 + 200) == 3
    assert await store.prune_results(acked_before=T0 + 300, limit=100) == 3
    assert await store.results_after("pi-a", 0, 10) == []
    assert len(await store.result_summaries(device_id="pi-a")) == 3


async def test_provider_state_is_one_row_the_last_writer_wins(store: Store) -> None:
    assert await store.provider_state() is None
    refused = ProviderState("refused", "provider refused the API key (401)",
                            "check ANTHROPIC_API_KEY in the worker's environment", "host:1", T0)
    await store.put_provider_state(refused)
    assert await store.provider_state() == refused
    ok = ProviderState("ok", "", "", "host:2", T0 + 5)
    await store.put_provider_state(ok)
    assert await store.provider_state() == ok


async def test_results_and_devices_commands_after_real_uploads(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with cloud_on(backend, tmp_path=tmp_path, request=request,
                        monkeypatch=monkeypatch) as cloud:
        op_key = tmp_path / "operator.key"  # kept off the cloud's data_dir
        await asyncio.to_thread(create_operator_key, cloud.data_dir, op_key)
        keys = await asyncio.to_thread(CloudKeys.load, cloud.data_dir)
        a = await cloud.enroll("pi-door")
        await cloud.enroll("pi-shed")  # enrolled, never uploads
        for seq in (1, 2):
            status, _, _ = await cloud.post_envelope(a.seal(make_event("pi-door", seq)))
            assert status == 202
        # One at a time: results are listed in the order they were produced.
        assert await reason_queued(cloud, keys) == 2

        def run(args: list[str]) -> tuple[int, str, str]:
            return cli([*args, "--operator-key", str(op_key)], capsys)

        code, out, err = await asyncio.to_thread(run, ["cloud", "results", "--json"])
        assert code == 0, err
        docs = [json.loads(line) for line in out.splitlines()]
        assert [(d["device_id"], d["seq"], d["reasoner"]) for d in docs] == [
            ("pi-door", 1, "echo"), ("pi-door", 2, "echo")]
        assert all(d["label"] == "person" and d["action"] and d["summary"]
                   and 0 <= d["confidence"] <= 1 and d["produced_at"] <= time.time()
                   for d in docs)

        code, out, _ = await asyncio.to_thread(run, ["cloud", "results", "--device", "pi-door",
                                                     "--since", "1h"])
        lines = out.splitlines()
        assert code == 0 and lines[0].split()[:4] == ["PRODUCED", "DEVICE", "SEQ", "LABEL"]
        assert len(lines) == 3 and all("pi-door" in ln and "echo" in ln for ln in lines[1:])
        code, out, _ = await asyncio.to_thread(run, ["cloud", "results", "--device", "pi-shed"])
        assert (code, out.strip()) == (0, "no results for pi-shed")
        code, out, _ = await asyncio.to_thread(run, ["cloud", "results", "--since",
                                                     "2999-01-01T00:00Z"])
        assert code == 0 and out.startswith("no results since 2999-01-01")
        code, _, err = await asyncio.to_thread(run, ["cloud", "results", "--since", "lately"])
        assert code == InputError.exit_code and "--since 'lately'" in err and "30m" in err
        assert "Traceback" not in err

        code, out, _ = await asyncio.to_thread(run, ["cloud", "devices", "--json"])
        devices = {d["device_id"]: d for d in map(json.loads, out.splitlines())}
        assert devices["pi-door"]["events"] == 2 and devices["pi-door"]["last_seen"] > 0
        assert devices["pi-door"]["last_result"]["seq"] == 2
        assert devices["pi-door"]["revoked_at"] is None
        assert (devices["pi-shed"]["events"], devices["pi-shed"]["last_result"]) == (0, None)
        code, out, _ = await asyncio.to_thread(run, ["cloud", "devices"])
        header, door, shed = out.splitlines()
        assert header.split()[:3] == ["DEVICE", "ENROLLED", "LAST"]
        assert door.split()[0] == "pi-door" and "person" in door and door.split()[3] == "2"
        assert shed.split()[0] == "pi-shed" and shed.split()[2:4] == ["-", "0"]
