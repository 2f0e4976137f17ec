"""A device whose state directory is on a tiny filesystem, for test_disk_full.py:

    unshare -rm sh -c 'mount -t tmpfs -o size=6m tmpfs "$0" && exec "$@"' MOUNT \
        python tiny_disk_child.py ENROLLED_STATE_DIR MOUNT EVENTS

Runs in a private mount namespace, where MOUNT is a real 6 MiB filesystem (tmpfs) that nobody
else sees. The enrolled device's keys are copied there, EVENTS events of 30 KB are captured into
the outbox (more than the filesystem holds), then ``edgekeeper device upload --burst`` runs as a
user would run it, against the cloud the device enrolled with. Prints one JSON document on
stdout with what happened.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

from test_uplink import DEVICE, event_body

from edgekeeper import config as config_mod
from edgekeeper import log
from edgekeeper.device.outbox import AsyncOutbox, OutboxSink
from edgekeeper.device.uplink import open_outbox

SIZE = 30_000


async def capture(config: config_mod.Config, n: int) -> dict[str, object]:
    outbox = AsyncOutbox(open_outbox(config))
    sink = OutboxSink(outbox)
    for _ in range(n):
        seq = await sink.next_seq()
        if seq is not None:
            await sink.deliver(event_body(seq, SIZE))
    stats = await outbox.stats()
    pending = await asyncio.to_thread(outbox.sync.pending_seqs)
    await outbox.close()
    return {"pending": pending, "dropped": stats.dropped_total, "lost": sink.lost,
            "last_seq": stats.last_seq, "quota_bytes": stats.quota_bytes}


def main(enrolled: Path, mount: Path, events: int) -> None:
    log.configure(level="error", fmt="json", stream=sys.stderr)
    state = mount / "device"
    shutil.copytree(enrolled, state)  # the keys and the enrollment (0600, 0700: copied as is)
    cfg = mount.parent / "tiny.toml"  # outside the tiny filesystem
    cfg.write_text(
        f'[device]\nid = "{DEVICE}"\nstate_dir = "{state}"\n'
        '[uplink]\nconnect_timeout_seconds = 2.0\nread_timeout_seconds = 5.0\n'
        'backoff_base_seconds = 0.02\nbackoff_cap_seconds = 0.2\n'
        '[log]\nlevel = "warning"\n'
    )
    config = config_mod.load(cfg, env={})
    report: dict[str, object] = {"filesystem_bytes": shutil.disk_usage(mount).total}
    report["captured"] = asyncio.run(capture(config, events))
    report["free_after_capture"] = shutil.disk_usage(mount).free
    upload = subprocess.run(
        [sys.executable, "-m", "edgekeeper.cli", "--config", str(cfg), "device", "upload",
         "--burst", "--give-up-after", "10"],
        capture_output=True, text=True, timeout=120,
    )
    report["upload"] = {"rc": upload.returncode, "out": upload.stdout[-2000:],
                        "err": upload.stderr[-3000:]}
    outbox = open_outbox(config)
    stats = outbox.stats()
    report["after"] = {"pending": stats.pending, "delivered_total": stats.delivered_total}
    outbox.close()
    report["ledger_created"] = (state / "results.sqlite").exists()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
