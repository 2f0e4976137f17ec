"""A device whose disk fills up, for test_disk_full.py:

    python tests/disk_full_child.py STATE_DIR CLOUD_URL

In its own process because the "full disk" is a file size limit (RLIMIT_FSIZE: a write that
would grow a file past it fails with EFBIG, which SQLite reports as SQLITE_IOERR where a real
ENOSPC gives SQLITE_FULL; the outbox treats both alike), and the limit applies to every file
the process writes. The device in STATE_DIR is already
enrolled with the cloud at CLOUD_URL. Prints one JSON document on stdout with what happened.

1. room: capture 4 events through the outbox sink and upload them, then capture 2 more that
   stay pending;
2. full: the limit is set one page above the largest file. Capture 6 more (each either gets
   no sequence number or is not stored), try to upload the pending ones (must back off, not
   crash), and let a LocalSink try to write an event under a 10 KB limit;
3. room again: the limit is lifted; capture 3 more and upload everything;
4. restart on a full disk: reopening the outbox under a 10 KB limit must fail with advice to
   free space, and succeed with every count intact once the limit is lifted.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sys
from pathlib import Path

from test_uplink import DEVICE, device_config, event_body, make_uplink

from edgekeeper import log
from edgekeeper.device import identity
from edgekeeper.device.events import Event
from edgekeeper.device.outbox import AsyncOutbox, OutboxSink
from edgekeeper.device.sink import LocalSink
from edgekeeper.device.uplink import open_outbox
from edgekeeper.sqlite import StorageUnwritable

SIZE = 30_000  # bytes of JPEG per event: a few SQLite pages each


async def capture(sink: OutboxSink, n: int) -> list[int | None]:
    seqs: list[int | None] = []
    for _ in range(n):
        seq = await sink.next_seq()
        if seq is not None:
            await sink.deliver(event_body(seq, SIZE))
        seqs.append(seq)
    return seqs


async def main(state_dir: Path, cloud_url: str) -> None:
    log.configure(level="warning", fmt="json", stream=sys.stderr)
    config = device_config(state_dir.parent, uplink={"backoff_cap_seconds": 0.05})
    assert config.device.state_dir == state_dir and config.device.id == DEVICE
    enrollment = identity.load_enrollment(state_dir, DEVICE)
    outbox = AsyncOutbox(open_outbox(config))
    sink = OutboxSink(outbox)
    report: dict[str, object] = {}
    async with make_uplink(config, outbox, enrollment, url=cloud_url) as up:
        report["room"] = await capture(sink, 4)
        report["room_upload"] = (await up.run_burst(give_up_after=5)).delivered
        report["pending"] = await capture(sink, 2)

        largest = max(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG rather than being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 4096, hard))
        report["full"] = await capture(sink, 6)
        report["full_lost"] = sink.lost
        burst = await up.run_burst(give_up_after=0.3)
        report["full_upload"] = {"delivered": burst.delivered, "remaining": burst.remaining,
                                 "last_error": burst.last_error,
                                 "waits": [w[0] for w in up.stats.waits]}
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))  # no room for a frame
        local = LocalSink(state_dir / "local")
        local_seq = await local.next_seq()
        if local_seq is not None:
            await local.deliver(_local_event(local_seq))
        report["local"] = {"seq": local_seq, "lost": local.lost, "delivered": local.delivered}

        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed
        report["again"] = await capture(sink, 3)
        report["again_upload"] = (await up.run_burst(give_up_after=5)).delivered
        stats = await outbox.stats()
        report["stats"] = {"pending": stats.pending, "dropped_total": stats.dropped_total,
                           "last_seq": stats.last_seq}
    await outbox.close()
    # Restarting on a full disk: SQLite cannot create its shared-memory file. The error must
    # say so (not "move the file aside", which would throw the stored events away).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))
    try:
        open_outbox(config).close()
        report["reopen_full"] = "opened"
    except StorageUnwritable as err:
        report["reopen_full"] = f"{err.message} | {err.fix}"
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    reopened = open_outbox(config)
    report["reopened_last_seq"] = reopened.stats().last_seq
    reopened.close()
    print(json.dumps(report), flush=True)


def _local_event(seq: int) -> Event:
    return Event(
        device_id=DEVICE, seq=seq, label="person", modality="vision", captured_at=0.0,
        trigger_t=0.0, start_t=0.0, end_t=1.0, decision={"rule": "test"},
        scores={"person": 0.9}, models={"vision": "person@1.0.0"},
        frames=(b"\xff\xd8" + bytes(SIZE),), frame_times=(0.5,),
    )


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
