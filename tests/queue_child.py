"""A stand-in for the ingest process in test_queue_segments:

    python tests/queue_child.py DATA_DIR FIRST_SEQ SEGMENT_BYTES
        (the kill test) enqueue events as fast as it can, and print each sequence number on
        stdout once ``enqueue`` has answered QUEUED (the moment the ingest would answer 202);
    python tests/queue_child.py --disk-full DATA_DIR
        enqueue 40 KB events one at a time while a file size limit (RLIMIT_FSIZE, what a full
        disk looks like to a writer: EFBIG instead of ENOSPC) stops the segment from growing,
        then lift it; print "SEQ queued" or "SEQ error ERRNO" for each. In its own process
        because the limit applies to every file the process writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import resource
import signal
import sys
from pathlib import Path

from edgekeeper import log
from edgekeeper.cloud.queue.base import EnqueueStatus, QueuedEvent
from edgekeeper.cloud.queue.sqlite import SQLiteQueue

DEVICE = "pi-kill"


def event(seq: int) -> QueuedEvent:
    # Envelope bytes derived from seq, so the test can check what comes back, 2-40 KB.
    body = hashlib.sha256(str(seq).encode()).digest() * (64 + (seq * 37) % 1200)
    return QueuedEvent(DEVICE, seq, hashlib.sha256(body).digest(), body, 1_790_000_000.0 + seq)


async def main(data_dir: Path, first: int, segment_bytes: int) -> None:
    log.configure(level="warning", fmt="json", stream=sys.stderr)  # stdout carries the seqs
    queue = await SQLiteQueue.open(data_dir / "queue.sqlite", segment_bytes=segment_bytes)
    next_seq = first

    async def writer() -> None:
        nonlocal next_seq
        while True:
            seq, next_seq = next_seq, next_seq + 1
            status = await queue.enqueue(event(seq))
            if status is not EnqueueStatus.QUEUED and status is not EnqueueStatus.DUPLICATE:
                raise SystemExit(f"seq {seq}: {status}")
            sys.stdout.write(f"{seq} {status.value}\n")
            sys.stdout.flush()

    await asyncio.gather(*(writer() for _ in range(8)))


def big_event(seq: int) -> QueuedEvent:
    body = hashlib.sha256(str(seq).encode()).digest() * 1250  # 40 KB
    return QueuedEvent(DEVICE, seq, hashlib.sha256(body).digest(), body, 1_790_000_000.0 + seq)


async def disk_full(data_dir: Path) -> None:
    log.configure(level="warning", fmt="json", stream=sys.stderr)
    queue = await SQLiteQueue.open(data_dir / "queue.sqlite")

    refused: list[int] = []

    async def put(seq: int) -> None:
        try:
            status = await queue.enqueue(big_event(seq))
        except OSError as err:
            refused.append(seq)
            print(f"{seq} error {err.errno}", flush=True)
        else:
            print(f"{seq} {status.value}", flush=True)

    await put(1)
    largest = max(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG rather than be killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 100_000, hard))
    for seq in range(2, 9):
        await put(seq)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed
    for seq in [*refused, 9]:  # the device retries what was refused, then goes on
        await put(seq)
    await queue.close()


if __name__ == "__main__":
    if sys.argv[1] == "--disk-full":
        asyncio.run(disk_full(Path(sys.argv[2])))
    else:
        asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
