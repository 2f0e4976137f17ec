"""A device whose disk fills up keeps running, loses only what it could not store (counted),
leaves nothing half-written, and delivers everything it stored, exactly once, once there is
room again. The device runs in tests/disk_full_child.py (a file size limit stands in for the
full disk); the cloud is the real ingest on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from test_uplink import DEVICE, device_config, enrolled, start_cloud


async def test_a_full_disk_loses_counted_events_and_bricks_nothing(tmp_path: Path) -> None:
    cloud = await start_cloud(tmp_path / "cloud")
    try:
        config = device_config(tmp_path)
        await enrolled(cloud, config)
        child = Path(__file__).with_name("disk_full_child.py")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(child), str(config.device.state_dir), cloud.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        report = json.loads(out)
        queued = await cloud.queued()
    finally:
        await cloud.close()

    assert report["room"] == [1, 2, 3, 4] and report["room_upload"] == 4
    assert report["pending"] == [5, 6]
    # While full: each capture either got no seq or was not stored; at least one was lost.
    full = report["full"]
    lost = report["full_lost"]
    assert lost >= 1 and len(full) == 6
    # The uplink could not even lease the pending events: it backed off, it did not crash.
    assert "disk_full" in report["full_upload"]["waits"], report["full_upload"]
    # The local sink wrote no event it could not finish.
    local_dir = config.device.state_dir / "local"
    assert report["local"] == {"seq": 1, "delivered": 0, "lost": 1}
    assert not list(local_dir.glob(".tmp-*")) and not list(local_dir.glob("0*"))
    index = local_dir / "index.jsonl"
    assert not index.exists() or index.read_bytes() == b""
    # Room again: capture and upload resume; the losses are on disk in dropped_total.
    assert report["again_upload"] >= 3 and report["stats"]["pending"] == 0
    assert report["stats"]["dropped_total"] == lost
    stored = [s for s in full if s is not None]
    sent = sorted(seq for dev, seq in queued if dev == DEVICE)
    assert len(sent) == len(set(sent))  # exactly once
    expected = {1, 2, 3, 4, 5, 6, *report["again"]}
    assert expected <= set(sent) <= expected | set(stored)
    assert len(sent) == 6 + 6 - lost + 3
    # Restarting while the disk is full: a clear refusal that keeps the file, then a clean open.
    assert "cannot be opened" in report["reopen_full"] and "free space" in report["reopen_full"]
    assert "move the file aside" not in report["reopen_full"]
    assert report["reopened_last_seq"] == report["stats"]["last_seq"]
