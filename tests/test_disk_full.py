"""A device whose disk fills up keeps running, loses only what it could not store (counted),
leaves nothing half-written, and delivers everything it stored, exactly once, once there is
room again. The device runs in tests/disk_full_child.py (a file size limit stands in for the
full disk) and tests/tiny_disk_child.py (a real 6 MiB tmpfs in a private mount namespace); the
cloud is the real ingest on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_uplink import DEVICE, device_config, enrolled, start_cloud

from edgekeeper.config import Config
from edgekeeper.device.outbox import RESERVE_BYTES


async def run_device(tmp_path: Path, argv: Callable[[Config, str], list[str]]
                     ) -> tuple[Config, dict[str, Any], list[tuple[str, int]]]:
    """Enroll a device with a real cloud, run ``argv(config, cloud_url)``; the device's config,
    the child's JSON report and what the cloud queued."""
    cloud = await start_cloud(tmp_path / "cloud")
    try:
        config = device_config(tmp_path)
        await enrolled(cloud, config)
        proc = await asyncio.create_subprocess_exec(
            *argv(config, cloud.url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        return config, json.loads(out), await cloud.queued()
    finally:
        await cloud.close()


async def test_a_full_disk_loses_counted_events_and_bricks_nothing(tmp_path: Path) -> None:
    child = Path(__file__).with_name("disk_full_child.py")
    config, report, queued = await run_device(
        tmp_path, lambda config, url: [sys.executable, str(child), str(config.device.state_dir),
                                       url],
    )

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


TINY_MB = 6
TINY_EVENTS = 220  # of 30 KB: 6.6 MB, more than the tiny filesystem holds


def tiny_filesystem_command(mount: Path, *child_args: str) -> list[str]:
    """The child's argv inside a private mount namespace with a TINY_MB tmpfs at ``mount``;
    skips the test when this machine cannot make one (no unshare, user namespaces disabled)."""
    unshare = shutil.which("unshare")
    probe = None
    if unshare is not None and sys.platform == "linux":
        probe = subprocess.run(
            [unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount}"],
            capture_output=True,
        )
    if unshare is None or probe is None or probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm): no tiny filesystem")
    child = Path(__file__).with_name("tiny_disk_child.py")
    script = f'mount -t tmpfs -o size={TINY_MB}m tmpfs "$0" && exec "$@"'
    return [unshare, "-rm", "sh", "-c", script, str(mount), sys.executable, str(child),
            *child_args]


@pytest.mark.slow
async def test_an_outbox_on_a_tiny_disk_leaves_room_to_drain_itself(tmp_path: Path) -> None:
    """Issue 15 item 1: the outbox must not fill its disk, and `device upload --burst` must
    deliver what it stored (it used to exit 1 from the results ledger's PRAGMA)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    _, report, queued = await run_device(
        tmp_path, lambda config, _url: tiny_filesystem_command(
            mount, str(config.device.state_dir), str(mount), str(TINY_EVENTS)),
    )

    captured = report["captured"]
    stored = captured["pending"]
    assert report["filesystem_bytes"] == TINY_MB * 1024 * 1024
    # The quota was bounded by the free space: what did not fit was evicted (counted), and the
    # disk kept room to drain (the reserve).
    assert captured["quota_bytes"] < TINY_MB * 1024 * 1024 // 2
    assert captured["last_seq"] == TINY_EVENTS and captured["lost"] == 0
    assert len(stored) >= 25 and len(stored) + captured["dropped"] == TINY_EVENTS
    assert report["free_after_capture"] >= RESERVE_BYTES
    # The upload delivered every stored event, exactly once, and exited 0 without a traceback.
    upload = report["upload"]
    assert upload["rc"] == 0, upload
    assert "Traceback" not in upload["err"] and f"delivered {len(stored)}," in upload["out"]
    assert sorted(seq for dev, seq in queued if dev == DEVICE) == stored
    assert report["after"] == {"pending": 0, "delivered_total": len(stored)}
    assert not report["ledger_created"]  # results were off: the ledger was never opened
