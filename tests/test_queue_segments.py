"""The embedded queue's segment files (cloud/queue/segments.py): envelopes are appended and
fdatasync'd before their index rows commit, and whatever a crash or power cut takes from the
index is rebuilt from the segments when the queue is next opened.

A power cut is modelled with real files: the index (queue.sqlite + its WAL) is copied at one
moment, more events are queued, and the copy is put back, as if the index commits after that
moment (which skip their fsync) never reached the disk while the segment appends (which are
fdatasync'd) did. SIGKILL is a real process killed at random points while enqueueing.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import shutil
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from queue_child import event as child_event

from edgekeeper.cloud.queue.base import EnqueueStatus, QueuedEvent
from edgekeeper.cloud.queue.segments import MAGIC, scan
from edgekeeper.cloud.queue.sqlite import SQLiteQueue

INDEX_FILES = ("queue.sqlite", "queue.sqlite-wal", "queue.sqlite-shm")


def ev(seq: int, size: int = 3000) -> QueuedEvent:
    body = hashlib.sha256(b"%d" % seq).digest() * (size // 32)
    return QueuedEvent("pi-1", seq, hashlib.sha256(body).digest(), body, 1_790_000_000.0 + seq)


def snapshot_index(data: Path, to: Path) -> None:
    to.mkdir()
    for name in INDEX_FILES:
        if (data / name).exists():
            shutil.copy2(data / name, to / name)


def restore_index(data: Path, frm: Path) -> None:
    for name in INDEX_FILES:
        (data / name).unlink(missing_ok=True)
        if (frm / name).exists():
            shutil.copy2(frm / name, data / name)


async def drain(q: SQLiteQueue) -> list[QueuedEvent]:
    """Lease and ack everything; return the events in delivery order."""
    out: list[QueuedEvent] = []
    while leases := await q.lease("w", count=100, visibility_s=60):
        for le in leases:
            out.append(le.event)
            assert await q.ack(le)
    return out


def segment_files(data: Path) -> list[Path]:
    return sorted((data / "queue-segments").glob("*.seg"))


async def test_envelopes_live_in_segments_and_the_index_stays_small(tmp_path: Path) -> None:
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    try:
        events = [ev(s, size=50_000) for s in range(1, 21)]
        assert await asyncio.gather(*(q.enqueue(e) for e in events)) == [
            EnqueueStatus.QUEUED
        ] * 20
        (seg,) = segment_files(tmp_path)
        assert seg.read_bytes().startswith(MAGIC) and seg.stat().st_size > 20 * 50_000
        assert oct(seg.stat().st_mode & 0o777) == "0o600"
        conn = sqlite3.connect(tmp_path / "queue.sqlite")
        try:
            inline = conn.execute("SELECT SUM(LENGTH(envelope)) FROM events").fetchone()[0]
        finally:
            conn.close()
        assert inline == 0
        assert await drain(q) == events
    finally:
        await q.close()


async def test_index_commits_lost_to_a_power_cut_are_rebuilt_exactly_once(tmp_path: Path) -> None:
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    for s in range(1, 6):
        assert await q.enqueue(ev(s)) is EnqueueStatus.QUEUED
    snapshot_index(tmp_path, tmp_path.parent / "index-at-5")
    for s in range(6, 31):  # answered QUEUED, index commits "lost" below
        assert await q.enqueue(ev(s)) is EnqueueStatus.QUEUED
    # The power goes: no close(), the index goes back to its last fsync'd state.
    await q._db.close()
    q._writer.close()  # type: ignore[union-attr]
    restore_index(tmp_path, tmp_path.parent / "index-at-5")

    q = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    try:
        assert (await q.stats()).seen == 30
        # The device retries what it never heard back about: still exactly once.
        assert await q.enqueue(ev(17)) is EnqueueStatus.DUPLICATE
        assert await drain(q) == [ev(s) for s in range(1, 31)]
    finally:
        await q.close()
    # Opening again finds nothing more to rebuild.
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    try:
        assert await drain(q) == []
    finally:
        await q.close()


async def test_a_torn_record_is_cut_off_and_what_follows_is_appended_cleanly(
    tmp_path: Path,
) -> None:
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    for s in range(1, 4):
        await q.enqueue(ev(s))
    snapshot_index(tmp_path, tmp_path.parent / "index-at-3")
    for s in range(4, 7):
        await q.enqueue(ev(s))
    await q._db.close()
    q._writer.close()  # type: ignore[union-attr]
    restore_index(tmp_path, tmp_path.parent / "index-at-3")
    # The cut came while seq 6 was being written: only part of its record reached the disk.
    (seg,) = segment_files(tmp_path)
    size = seg.stat().st_size
    os.truncate(seg, size - 1000)

    q = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    try:
        record = (size - seg.stat().st_size)
        assert record > 3000  # the whole torn record went, not just its last 1000 bytes
        assert await q.enqueue(ev(6)) is EnqueueStatus.QUEUED  # never stored, so new
        assert await q.enqueue(ev(7)) is EnqueueStatus.QUEUED
        assert [e.seq for e in await drain(q)] == [1, 2, 3, 4, 5, 6, 7]
    finally:
        await q.close()


async def test_another_process_opening_the_queue_leaves_a_live_writer_alone(
    tmp_path: Path,
) -> None:
    ingest = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    worker: SQLiteQueue | None = None
    try:
        await ingest.enqueue(ev(1))
        worker = await SQLiteQueue.open(tmp_path / "queue.sqlite")  # recovery runs here
        await ingest.enqueue(ev(2))
        assert [e.seq for e in await drain(worker)] == [1, 2]
        conn = sqlite3.connect(tmp_path / "queue.sqlite")
        try:
            assert conn.execute("SELECT sealed FROM segments").fetchall() == [(0,)]
        finally:
            conn.close()
    finally:
        if worker is not None:
            await worker.close()
        await ingest.close()


async def test_segments_are_rolled_over_and_deleted_once_nothing_points_into_them(
    tmp_path: Path,
) -> None:
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite", segment_bytes=20_000)
    for s in range(1, 21):
        await q.enqueue(ev(s, size=6000))
    assert len(segment_files(tmp_path)) == 5  # four events a segment
    leases = await q.lease("w", count=20, visibility_s=60)
    held = next(le for le in leases if le.event.seq == 2)  # a slow worker holds one event
    for le in leases:
        if le is not held:
            assert await q.ack(le)
    for s in range(21, 28):  # rollovers: each collects the segments nothing points into
        await q.enqueue(ev(s, size=6000))
    assert len(segment_files(tmp_path)) == 3  # seq 2's, then 21-24's and 25-27's
    assert [e.seq for e in await drain(q)] == list(range(21, 28))
    await q.close()  # seals the current segment and collects again
    assert len(segment_files(tmp_path)) == 1  # only the one seq 2 is in
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite", segment_bytes=20_000)
    try:
        assert await q.ack(held)
    finally:
        await q.close()
    assert segment_files(tmp_path) == []


async def test_a_missing_segment_dead_letters_its_events_with_the_reason(tmp_path: Path) -> None:
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite", segment_bytes=5000)
    for s in range(1, 4):
        await q.enqueue(ev(s, size=6000))  # one segment each
    await q.close()
    first = segment_files(tmp_path)[0]
    first.unlink()  # someone "cleaned up" the data directory
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite", segment_bytes=5000)
    try:
        assert [e.seq for e in await drain(q)] == [2, 3]
        (dead,) = await q.dead_letters()
        assert dead.event.seq == 1
        assert "envelope unreadable" in dead.reason and first.name in dead.reason
        assert "fix: restore the segment file" in dead.reason  # a PermanentError, with its fix
    finally:
        await q.close()


OLD_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
    payload_hash BLOB NOT NULL, received_at REAL NOT NULL, available_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, lease_token TEXT, leased_by TEXT, last_error TEXT,
    envelope BLOB NOT NULL
);
CREATE TABLE seen (
    device_id TEXT NOT NULL, seq INTEGER NOT NULL, payload_hash BLOB NOT NULL,
    received_at REAL NOT NULL, PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
"""


async def test_a_queue_file_from_before_segments_keeps_its_events(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "queue.sqlite")
    conn.executescript(OLD_SCHEMA)
    old = ev(1)
    conn.execute(
        "INSERT INTO events (device_id, seq, payload_hash, received_at, available_at, envelope)"
        " VALUES (?,?,?,?,0,?)", (old.device_id, old.seq, old.payload_hash, old.received_at,
                                  old.envelope),
    )
    conn.execute("INSERT INTO seen VALUES (?,?,?,?)",
                 (old.device_id, old.seq, old.payload_hash, old.received_at))
    conn.commit()
    conn.close()
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    try:
        assert await q.enqueue(ev(1)) is EnqueueStatus.DUPLICATE
        assert await q.enqueue(ev(2)) is EnqueueStatus.QUEUED
        assert await drain(q) == [ev(1), ev(2)]
    finally:
        await q.close()


KILLS = 20


@pytest.mark.slow
async def test_sigkill_while_enqueueing_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """Every event the child reported QUEUED (= the ingest's 202) is in the queue exactly once
    after twenty SIGKILLs at random moments, with segments rolling over meanwhile."""
    rng = random.Random(20261130)
    child = Path(__file__).with_name("queue_child.py")
    confirmed: set[int] = set()
    next_first = 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(child.parent), os.environ.get("PYTHONPATH", "")])}
    for _ in range(KILLS):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(child), str(tmp_path), str(next_first), "400000",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        assert proc.stdout is not None
        seen_now = 0
        target = rng.randint(5, 300)
        while seen_now < target:
            line = await proc.stdout.readline()
            if not line:
                break
            confirmed.add(int(line.split()[0]))
            seen_now += 1
        await asyncio.sleep(rng.random() * 0.02)  # land somewhere inside a commit
        proc.send_signal(signal.SIGKILL)
        rest, err = await proc.communicate()
        for line in rest.splitlines():
            confirmed.add(int(line.split()[0]))
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        # Like a device: start again from the first event never confirmed.
        missing = [s for s in range(1, max(confirmed) + 1) if s not in confirmed]
        next_first = missing[0] if missing else max(confirmed) + 1

    q = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    try:
        delivered = await drain(q)
    finally:
        await q.close()
    seqs = [e.seq for e in delivered]
    assert len(seqs) == len(set(seqs)), "an event was queued twice"
    assert confirmed <= set(seqs), f"lost: {sorted(confirmed - set(seqs))[:10]}"
    for e in delivered:
        assert e == child_event(e.seq)  # the bytes that come back are the bytes that went in
    assert len(confirmed) > KILLS * 5


async def test_a_full_disk_refuses_enqueues_and_leaves_no_half_written_record(
    tmp_path: Path,
) -> None:
    """A write that fails part-way (here EFBIG from a file size limit in the child process, as
    a full disk gives ENOSPC) is refused and cut back, so the records appended once space is
    back follow the last good one directly: nothing half-written, nothing lost."""
    child = Path(__file__).with_name("queue_child.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(child), "--disk-full", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    answers = [line.split() for line in out.decode().splitlines()]
    refused = [int(a[0]) for a in answers if a[1] == "error"]
    queued = [int(a[0]) for a in answers if a[1] == "queued"]
    assert refused and all(a[2] == str(errno.EFBIG) for a in answers if a[1] == "error")
    assert sorted(queued) == list(range(1, 10))  # every refused one went in on its retry

    (seg,) = segment_files(tmp_path)
    records, end = await asyncio.to_thread(scan, seg, int(seg.stem), 0)
    assert end == seg.stat().st_size  # no torn or stray bytes anywhere in the file
    assert [r.event.seq for r in records] == queued
    q = await SQLiteQueue.open(tmp_path / "queue.sqlite")
    try:
        assert [e.seq for e in await drain(q)] == queued
    finally:
        await q.close()
