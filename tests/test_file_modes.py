"""Everything a cloud and a device create is private: directories 0700, files 0600, under the
usual umask 022 (docs/security.md). Real cloud on 127.0.0.1, real device outbox, uplink,
results ledger and local sink; the tree is walked while the SQLite files are open, so the -wal
and -shm files are checked too."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_results import publish, result
from test_uplink import (
    DEVICE,
    capture,
    device_config,
    enrolled,
    make_uplink,
    opened_outbox,
    start_cloud,
)

from edgekeeper.device.events import Event
from edgekeeper.device.outbox import OutboxSink
from edgekeeper.device.results import ResultActions
from edgekeeper.device.sink import LocalSink


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def loose(root: Path) -> list[str]:
    """Every directory under ``root`` (itself included) not 0700, every file not 0600."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            found.append(f"{path.relative_to(root.parent)} {mode:04o}")
    return found


async def test_cloud_and_device_create_only_private_files(tmp_path: Path, umask_022: None
                                                          ) -> None:
    # Parents that do not exist yet are ours too: `srv/` and `pi/` are created 0700 as well.
    cloud = await start_cloud(tmp_path / "srv" / "cloud")
    config = device_config(tmp_path / "pi", results={"jsonl": "results.jsonl"})
    try:
        enrollment = await enrolled(cloud, config)
        outbox = await opened_outbox(config)
        async with make_uplink(config, outbox, enrollment) as up:
            await capture(OutboxSink(outbox), 3)
            assert (await up.run_burst(give_up_after=5)).delivered == 3
        await capture(OutboxSink(outbox), 1)  # one left pending: the WAL holds something
        await publish(cloud, result(1))
        actions = ResultActions.from_config(config)
        assert await actions.handle("cloud:1", result(1)) == "handled"
        local = LocalSink(config.device.state_dir / "local")
        seq = await local.next_seq()
        assert seq is not None
        await local.deliver(_event(seq))
        assert local.delivered == 1

        names = {p.name for p in tmp_path.rglob("*")}
        for made in ("queue.sqlite-wal", "queue.sqlite-shm", "store.sqlite-wal",
                     "outbox.sqlite-wal", "outbox.sqlite-shm", "results.sqlite-wal",
                     "queue-segments", "keys", "enrollment.json", "results.jsonl", "index.jsonl",
                     "meta.json"):
            assert made in names, f"{made} was not created: the test checks less than it says"
        assert loose(tmp_path / "srv") == []
        assert loose(tmp_path / "pi") == []
        await actions.close()
    finally:
        await cloud.close()


def _event(seq: int) -> Event:
    return Event(
        device_id=DEVICE, seq=seq, label="person", modality="vision", captured_at=0.0,
        trigger_t=0.0, start_t=0.0, end_t=1.0, decision={"rule": "test"},
        scores={"person": 0.9}, models={"vision": "person@1.0.0"},
        frames=(b"\xff\xd8" + bytes(100),), frame_times=(0.5,),
    )

