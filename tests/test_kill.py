"""Acceptance: the device uploader is killed with SIGKILL at random points during uploads, again
and again; afterwards every committed event is in the cloud's queue exactly once.

The device is the real CLI (``python -m edgekeeper.cli device upload --burst``) in its own
process, against a real ingest served by this test on 127.0.0.1. Between runs the "device"
keeps capturing (new events committed to the same outbox file from this process), as it would
while its uploader restarts.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_uplink import DEVICE, enrolled, event_body, start_cloud, until

from edgekeeper import config as config_mod
from edgekeeper.device.outbox import Outbox

KILLS_DURING_UPLOAD = 20


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "device.toml"
    path.write_text(
        f"""
[device]
id = "{DEVICE}"
state_dir = "{tmp_path / 'device'}"

[log]
level = "warning"
format = "json"

[uplink]
connect_timeout_seconds = 2.0
read_timeout_seconds = 5.0
backoff_base_seconds = 0.05
backoff_cap_seconds = 0.5
batch = 4
concurrency = 2
"""
    )
    return path


def cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "edgekeeper.cli", "--config", str(config), *args]


@pytest.mark.slow
async def test_sigkill_during_uploads_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    cloud = await start_cloud(tmp_path / "cloud", rate_per_second=1000.0, rate_burst=1000)
    cfg_path = write_config(tmp_path)
    config = await asyncio.to_thread(config_mod.load, cfg_path, env={})
    await enrolled(cloud, config)
    outbox = await asyncio.to_thread(Outbox, config.outbox_path, device_id=DEVICE)
    rng = random.Random(20261123)
    committed: list[int] = []

    def capture(n: int) -> None:
        for _ in range(n):
            seq = outbox.next_seq()
            outbox.put(event_body(seq, size=rng.randint(1_000, 60_000)).encode(), seq, 0,
                       "person@1.0.0")
            committed.append(seq)

    await asyncio.to_thread(capture, 40)
    kills_mid_upload = kills_other = runs = 0
    stderr_log = tmp_path / "device-stderr.log"
    try:
        while kills_mid_upload < KILLS_DURING_UPLOAD:
            runs += 1
            assert runs < 80, "the uploader keeps finishing before it can be killed"
            before = len(await cloud.queued())
            with stderr_log.open("ab") as err:
                proc = await asyncio.create_subprocess_exec(
                    *cli(cfg_path, "device", "upload", "--burst"),
                    stdout=subprocess.DEVNULL, stderr=err,
                )
            mid_upload = rng.random() < 0.8
            if mid_upload:
                # Let this process get a few events into the queue, then kill it a moment
                # later: between sealing, the POST, the 202 and the outbox delete.
                target = before + rng.randint(1, 4)

                async def progressed(
                    target: int = target, proc: asyncio.subprocess.Process = proc
                ) -> bool:
                    return proc.returncode is not None or len(await cloud.queued()) >= target

                await until(progressed, timeout=30)
                await asyncio.sleep(rng.uniform(0.0, 0.03))
            else:
                # Anywhere at all: interpreter start-up, opening the outbox, leasing ...
                await asyncio.sleep(rng.uniform(0.0, 0.8))
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                if mid_upload:
                    kills_mid_upload += 1
                else:
                    kills_other += 1
            await proc.wait()
            # The device keeps capturing while its uploader is down.
            await asyncio.to_thread(capture, rng.randint(3, 8))

        # Finally, one run that is not killed drains everything that is left.
        done = await asyncio.create_subprocess_exec(
            *cli(cfg_path, "device", "upload", "--burst"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = await done.communicate()
        assert done.returncode == 0, err.decode()[-2000:]
        assert b"remaining 0" in out

        queued = await cloud.queued()
        seqs = [s for d, s in queued if d == DEVICE]
        assert len(seqs) == len(set(seqs)), "an event was queued twice"
        assert sorted(seqs) == sorted(committed), (
            f"lost: {sorted(set(committed) - set(seqs))[:10]}, "
            f"unexpected: {sorted(set(seqs) - set(committed))[:10]}"
        )
        stats, dead = await asyncio.to_thread(lambda: (outbox.stats(), outbox.dead_letters()))
        assert stats.pending == 0 and dead == []
        assert kills_mid_upload >= KILLS_DURING_UPLOAD
        status = await asyncio.create_subprocess_exec(
            *cli(cfg_path, "device", "status", "--json"), stdout=subprocess.PIPE
        )
        doc = json.loads((await status.communicate())[0])
        assert doc["pending"] == 0 and doc["last_seq"] == max(committed)
    finally:
        await asyncio.to_thread(outbox.close)
        await cloud.close()
    # The outbox survived every kill intact.
    db = sqlite3.connect(config.outbox_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    print(f"{kills_mid_upload} kills mid-upload, {kills_other} elsewhere, {runs} runs, "
          f"{len(committed)} events, {time.process_time():.1f} s CPU")
