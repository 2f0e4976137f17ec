"""A stand-in for the ingest process in test_queue_segments' kill test: enqueue events into the
embedded queue as fast as it can, and print each sequence number on stdout once ``enqueue``
has answered QUEUED (the moment the ingest would answer 202).

    python tests/queue_child.py DATA_DIR FIRST_SEQ SEGMENT_BYTES
"""

from __future__ import annotations

import asyncio
import hashlib
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


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
