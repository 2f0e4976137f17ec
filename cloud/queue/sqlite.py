"""The embedded queue: an index in ``queue.sqlite`` (edgekeeper/sqlite.py) and the envelopes
in append-only segment files beside it (cloud/queue/segments.py).

Enqueues are group-committed on the database thread: a batch is appended to a segment and
fdatasync'd, then its index rows are committed, then its callers hear QUEUED. The tables, the
durability argument and the recovery of a dead writer's segment are in docs/storage.md.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from edgekeeper.cloud.queue.base import (
    DEFAULT_SEEN_RETENTION_S,
    DeadLetter,
    EnqueueStatus,
    Lease,
    QueuedEvent,
    QueueStats,
)
from edgekeeper.cloud.queue.segments import (
    SEGMENT_BYTES,
    Located,
    SegmentReader,
    SegmentWriter,
    iter_segment_files,
    scan,
    segment_name,
    try_lock,
)
from edgekeeper.fs import private_dir
from edgekeeper.log import get_logger
from edgekeeper.sqlite import Database, Pragmas, transaction

log = get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    -- Not AUTOINCREMENT (one less page written per commit): a new id is max(id) + 1, so ids
    -- still grow in arrival order among the events present, which is all FIFO needs.
    -- (device_id, seq) is unique through `seen`, checked in the same transaction.
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    payload_hash BLOB NOT NULL,
    received_at REAL NOT NULL,
    available_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_token TEXT,
    leased_by TEXT,
    last_error TEXT,
    envelope BLOB NOT NULL,          -- empty when the envelope lies in a segment
    segment INTEGER,
    seg_offset INTEGER,
    seg_length INTEGER
);
CREATE INDEX IF NOT EXISTS events_available ON events (available_at, id);
CREATE TABLE IF NOT EXISTS seen (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    payload_hash BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_received ON seen (received_at);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    payload_hash BLOB NOT NULL,
    envelope BLOB NOT NULL,
    received_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    -- AUTOINCREMENT: an id is never reused, so a file name always means one segment.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    indexed_upto INTEGER NOT NULL DEFAULT 0,  -- records before this offset are in `events`
    sealed INTEGER NOT NULL DEFAULT 0         -- 1: its writer is done (deleted once unused)
)
"""

# The index rows are small now that envelopes live in segments: small pages mean fewer bytes
# written per commit (files made before the segments, with 64 KiB pages, keep theirs).
PAGE_SIZE = 4096

# At most this many group commits run back to back in one database-thread job before other
# queue calls (lease, ack, stats) get their turn.
_MAX_CHAINED_BATCHES = 8

# Prune the dedupe table every this many committed batches (cheap: an indexed range delete).
_PRUNE_EVERY = 256


class SQLiteQueue:
    """EventQueue on one SQLite file. Create with ``await SQLiteQueue.open(path)``."""

    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = 5,
        seen_retention_s: float = DEFAULT_SEEN_RETENTION_S,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.max_attempts = max_attempts
        self.segment_bytes = segment_bytes
        self.seen_retention_s = seen_retention_s
        self._db = db
        self.segments_dir = db.path.parent / f"{db.path.stem}-segments"
        self._writer: SegmentWriter | None = None  # only a process that enqueues has one
        self._reader = SegmentReader(self.segments_dir)
        self._pending: list[tuple[QueuedEvent, asyncio.Future[EnqueueStatus]]] = []
        # True while a drain job is scheduled on the database thread. The thread owns the
        # group commit: no asyncio task runs it, so none can be left behind; close() waits for
        # it to end (under _lock, like _pending).
        self._draining = False
        self._lock = threading.Lock()
        self._batches = 0
        # How many events each commit carried, for the bench and logs.
        self.commits = 0
        self.committed_events = 0

    @classmethod
    async def open(cls, path: Path, **kwargs: Any) -> SQLiteQueue:
        db = await Database.open(path, name="queue", schema=SCHEMA,
                                 pragmas=Pragmas(page_size=PAGE_SIZE), setting="cloud.data_dir")
        queue = cls(db, **kwargs)
        try:
            await db.run(queue._prepare)
        except BaseException:
            await db.close()
            raise
        return queue

    # --- segments: setup, recovery, rollover, collection ---------------------------------

    def _prepare(self, conn: sqlite3.Connection) -> None:
        private_dir(self.segments_dir)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
        if "segment" not in columns:  # a queue file from before segments: add the columns
            with transaction(conn):
                for column in ("segment", "seg_offset", "seg_length"):
                    conn.execute(f"ALTER TABLE events ADD COLUMN {column} INTEGER")
        # Collection asks "does any event still point into segment N?" at every rollover: a
        # lookup here, not a scan of a backlog that may hold a million events. (Created here,
        # not in SCHEMA, because an older file gets its segment column only just above.)
        conn.execute(
            "CREATE INDEX IF NOT EXISTS events_segment ON events (segment)"
            " WHERE segment IS NOT NULL"
        )
        self._recover(conn)
        self._collect(conn)

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Index what a dead writer appended but did not index (a crash or power cut between
        its fdatasync and its index commit, or an index commit lost with the power), cut off a
        torn tail, and seal the segment. Segments a live writer holds are left alone."""
        rows = conn.execute("SELECT id, indexed_upto, sealed FROM segments").fetchall()
        for sid, upto, sealed in rows:
            path = self.segments_dir / segment_name(sid)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = -1
            if size <= upto and sealed:
                continue
            fd = try_lock(path) if size >= 0 else None
            if fd is None and size >= 0:
                continue  # its writer is alive
            try:
                records, good_end = scan(path, sid, upto) if fd is not None else ([], upto)
                added = 0
                with transaction(conn):
                    for rec in records:
                        ev = rec.event
                        if conn.execute(
                            "SELECT 1 FROM seen WHERE device_id = ? AND seq = ?",
                            (ev.device_id, ev.seq),
                        ).fetchone() is not None:
                            continue  # indexed before, or a retry of it was
                        self._insert_rows(conn, [(ev, rec.where)])
                        added += 1
                    conn.execute(
                        "UPDATE segments SET indexed_upto = ?, sealed = 1 WHERE id = ?",
                        (max(upto, good_end), sid),
                    )
                if fd is not None and good_end < size:
                    os.ftruncate(fd, good_end)
                    os.fsync(fd)
                    log.warning("queue.segment_tail_cut", segment=path.name,
                                bytes=size - good_end,
                                why="a record cut short by a crash (nobody was told it was queued)")
                if added:
                    log.warning("queue.segment_recovered", segment=path.name, events=added)
            finally:
                if fd is not None:
                    os.close(fd)
        # A file with no row: its creating transaction never committed, or collection deleted
        # the row and not yet the file. Nothing points into it. Inside a write transaction:
        # a writer creates its file and takes its lock while holding the write lock, so no new
        # segment can be caught between its creation and its lock.
        with transaction(conn):
            known = {sid for (sid,) in conn.execute("SELECT id FROM segments")}
            for sid, path in iter_segment_files(self.segments_dir):
                if sid not in known:
                    fd = try_lock(path)
                    if fd is not None:
                        path.unlink(missing_ok=True)
                        os.close(fd)

    def _collect(self, conn: sqlite3.Connection) -> None:
        """Delete sealed segments no queued event points into (row first, then the file)."""
        with transaction(conn):
            unused = [
                sid for (sid,) in conn.execute(
                    "SELECT id FROM segments s WHERE sealed = 1 AND NOT EXISTS"
                    " (SELECT 1 FROM events e WHERE e.segment = s.id)"
                ).fetchall()
            ]
            for sid in unused:
                conn.execute("DELETE FROM segments WHERE id = ?", (sid,))
        for sid in unused:
            self._reader.forget(sid)
            (self.segments_dir / segment_name(sid)).unlink(missing_ok=True)

    def _current_writer(self, conn: sqlite3.Connection) -> SegmentWriter:
        """The segment this process appends to; a new one when it is full or failed."""
        old = self._writer
        if old is not None and not old.closed and old.size < self.segment_bytes:
            return old
        if old is not None:
            old.close()
            self._writer = None
            with transaction(conn):
                conn.execute("UPDATE segments SET sealed = 1 WHERE id = ?", (old.segment_id,))
            self._collect(conn)
        with transaction(conn):
            # The row commits (fsync'd) only after the file exists and is locked by us, so
            # recovery elsewhere never sees this segment without its writer's lock on it.
            sid = conn.execute("INSERT INTO segments (indexed_upto) VALUES (0)").lastrowid
            assert sid is not None
            self._writer = SegmentWriter(self.segments_dir, sid)
        return self._writer

    def _release_writer(self, conn: sqlite3.Connection) -> None:
        if self._writer is not None:
            sid = self._writer.segment_id
            self._writer.close()
            self._writer = None
            with transaction(conn):
                conn.execute("UPDATE segments SET sealed = 1 WHERE id = ?", (sid,))
        self._collect(conn)
        self._reader.close()

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, rows: list[tuple[QueuedEvent, Located]]) -> None:
        conn.executemany(
            "INSERT INTO seen (device_id, seq, payload_hash, received_at) VALUES (?,?,?,?)",
            [(ev.device_id, ev.seq, ev.payload_hash, ev.received_at) for ev, _ in rows],
        )
        conn.executemany(
            "INSERT INTO events (device_id, seq, payload_hash, envelope, received_at,"
            " available_at, segment, seg_offset, seg_length) VALUES (?,?,?,X'',?,0.0,?,?,?)",
            [
                (ev.device_id, ev.seq, ev.payload_hash, ev.received_at, w.segment, w.offset,
                 w.length)
                for ev, w in rows
            ],
        )

    @property
    def path(self) -> Path:
        return self._db.path

    # --- enqueue (group commit) ---------------------------------------------------------

    async def enqueue(self, event: QueuedEvent) -> EnqueueStatus:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[EnqueueStatus] = loop.create_future()
        with self._lock:  # the database thread takes batches from this list
            self._pending.append((event, fut))
            start, self._draining = not self._draining, True
        if start:
            self._schedule_drain(loop)
        # shield: a client that disconnects must not cancel a commit other callers share.
        return await asyncio.shield(fut)

    def _schedule_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            job = self._db.submit(self._drain, loop)
        except RuntimeError as err:  # the database is closed: nobody will commit these
            with self._lock:
                self._draining = False
            loop.call_soon_threadsafe(self._fail, self._take(), err)
            return
        job.add_done_callback(lambda done: self._drain_failed(done, loop))

    def _drain_failed(self, done: Future[None], loop: asyncio.AbstractEventLoop) -> None:
        err = done.exception()
        if err is not None:  # the job itself failed (database closed): fail the waiters
            with self._lock:
                self._draining = False
            failure = err if isinstance(err, Exception) else RuntimeError(err)
            loop.call_soon_threadsafe(self._fail, self._take(), failure)

    def _take(self) -> list[tuple[QueuedEvent, asyncio.Future[EnqueueStatus]]]:
        with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                self._draining = False  # under the lock: the next enqueue schedules a drain
        return batch

    def _drain(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        """On the database thread: commit batch after batch while uploads keep arriving.

        The next commit starts as soon as the previous one is fsync'd, without a round trip
        through the (busy) event loop in between; each batch's callers are woken as soon as
        their own commit is done. After a few batches the job schedules itself again behind
        the calls that queued meanwhile (lease, ack, stats), so they are not starved.
        """
        for _ in range(_MAX_CHAINED_BATCHES):
            batch = self._take()
            if not batch:
                return
            try:
                outcomes = self._write_batch(conn, [e for e, _ in batch])
            except BaseException as err:
                failure = (self._db.classify(err) if isinstance(err, sqlite3.Error)
                           else err if isinstance(err, Exception) else RuntimeError(err))
                loop.call_soon_threadsafe(self._fail, batch, failure)
                if not isinstance(err, Exception):
                    raise
                continue
            loop.call_soon_threadsafe(self._settle, batch, outcomes)
        self._schedule_drain(loop)  # still _draining: more arrived meanwhile, or none (ends)

    @staticmethod
    def _settle(
        batch: list[tuple[QueuedEvent, asyncio.Future[EnqueueStatus]]],
        outcomes: list[EnqueueStatus],
    ) -> None:
        for (_, fut), outcome in zip(batch, outcomes, strict=True):
            if not fut.done():
                fut.set_result(outcome)

    @staticmethod
    def _fail(
        batch: list[tuple[QueuedEvent, asyncio.Future[EnqueueStatus]]], err: Exception
    ) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(err)

    def _write_batch(
        self, conn: sqlite3.Connection, events: list[QueuedEvent]
    ) -> list[EnqueueStatus]:
        outcomes: list[EnqueueStatus] = []
        fresh: list[QueuedEvent] = []
        in_batch: dict[tuple[str, int], bytes] = {}
        now = time.time()
        writer = self._current_writer(conn)
        # The segment's fdatasync below is what makes the batch durable; the index commit may
        # skip its own (see the module docstring). Back to FULL for every other transaction.
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            with transaction(conn):
                for ev in events:
                    key = (ev.device_id, ev.seq)
                    known = in_batch.get(key)
                    if known is None:
                        row = conn.execute(
                            "SELECT payload_hash FROM seen WHERE device_id = ? AND seq = ?", key
                        ).fetchone()
                        if row is None:
                            in_batch[key] = ev.payload_hash
                            fresh.append(ev)
                            outcomes.append(EnqueueStatus.QUEUED)
                            continue
                        known = bytes(row[0])
                    same = known == ev.payload_hash
                    outcomes.append(EnqueueStatus.DUPLICATE if same else EnqueueStatus.CONFLICT)
                if fresh:
                    located = writer.append(fresh)
                    self._insert_rows(conn, list(zip(fresh, located, strict=True)))
                    conn.execute(
                        "UPDATE segments SET indexed_upto = ? WHERE id = ?",
                        (writer.size, writer.segment_id),
                    )
                self._batches += 1
                if self._batches % _PRUNE_EVERY == 0:
                    # Only keys no longer in the queue are forgotten: an event still waiting
                    # keeps its key however old it is.
                    conn.execute(
                        "DELETE FROM seen WHERE received_at < ? AND NOT EXISTS (SELECT 1 FROM"
                        " events e WHERE e.device_id = seen.device_id AND e.seq = seen.seq)",
                        (now - self.seen_retention_s,),
                    )
        finally:
            conn.execute("PRAGMA synchronous = FULL")
        self.commits += 1
        self.committed_events += len(events)
        return outcomes

    # --- leasing ------------------------------------------------------------------------

    async def lease(self, consumer: str, *, count: int, visibility_s: float) -> list[Lease]:
        return await self._db.run(self._lease, consumer, count, visibility_s)

    def _lease(
        self, conn: sqlite3.Connection, consumer: str, count: int, visibility_s: float
    ) -> list[Lease]:
        now = time.time()
        out: list[Lease] = []
        with transaction(conn):
            while len(out) < count:
                rows = conn.execute(
                    "SELECT id, device_id, seq, payload_hash, envelope, received_at, attempts,"
                    " last_error, segment, seg_offset, seg_length FROM events"
                    " WHERE available_at <= ? ORDER BY id LIMIT ?",
                    (now, count - len(out)),
                ).fetchall()
                if not rows:
                    break
                for (rid, dev, seq, phash, env, received, attempts, last_error, segment,
                     offset, length) in rows:
                    if segment is not None:
                        try:
                            env = self._reader.read(Located(segment, offset, length))
                        except OSError as err:
                            # The bytes are gone (segment file removed or cut by hand): say so
                            # once, as a dead letter, instead of failing every lease after it.
                            log.error("queue.envelope_unreadable", device_id=dev, seq=seq,
                                      error=str(err))
                            self._move_dead(
                                conn, rid, QueuedEvent(dev, seq, bytes(phash), b"", received),
                                attempts, f"envelope unreadable: {err}", now,
                            )
                            continue
                    event = QueuedEvent(dev, seq, bytes(phash), bytes(env), received)
                    if attempts >= self.max_attempts:
                        # Its previous deliveries all ended without ack or nack: the worker
                        # died on it. Deliver no more.
                        self._move_dead(
                            conn, rid, event, attempts,
                            last_error or f"lease expired {attempts} times without ack", now,
                        )
                        continue
                    token = f"{rid}:{secrets.token_hex(8)}"
                    until = now + visibility_s
                    conn.execute(
                        "UPDATE events SET available_at = ?, attempts = attempts + 1,"
                        " lease_token = ?, leased_by = ? WHERE id = ?",
                        (until, token, consumer, rid),
                    )
                    out.append(Lease(token, event, attempts + 1, consumer, until))
        # Keep no segment open between leases: a segment deleted meanwhile (by the ingest's
        # collection) would otherwise keep its disk space until the descriptor closed.
        self._reader.close()
        return out

    @staticmethod
    def _move_dead(
        conn: sqlite3.Connection, rid: int, ev: QueuedEvent, attempts: int, reason: str, now: float
    ) -> None:
        conn.execute(
            "INSERT INTO dead (device_id, seq, payload_hash, envelope, received_at, attempts,"
            " reason, failed_at) VALUES (?,?,?,?,?,?,?,?)",
            (ev.device_id, ev.seq, ev.payload_hash, ev.envelope, ev.received_at, attempts,
             reason[:2000], now),
        )
        conn.execute("DELETE FROM events WHERE id = ?", (rid,))

    @staticmethod
    def _row_id(lease: Lease) -> int:
        return int(lease.receipt.split(":", 1)[0])

    async def ack(self, lease: Lease) -> bool:
        def do(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cur = conn.execute(
                    "DELETE FROM events WHERE id = ? AND lease_token = ?",
                    (self._row_id(lease), lease.receipt),
                )
            return cur.rowcount == 1

        return await self._db.run(do)

    async def extend(self, lease: Lease, *, visibility_s: float) -> bool:
        def do(conn: sqlite3.Connection) -> bool:
            # Matching the lease token is the whole check: a re-lease draws a new token, and
            # ack/nack/dead-lettering delete the row or clear it, so a lost lease matches no row.
            # A lease that expired but nobody took yet is still ours to extend.
            with transaction(conn):
                cur = conn.execute(
                    "UPDATE events SET available_at = ? WHERE id = ? AND lease_token = ?",
                    (time.time() + max(0.0, visibility_s), self._row_id(lease), lease.receipt),
                )
            return cur.rowcount == 1

        return await self._db.run(do)

    async def nack(self, lease: Lease, *, reason: str, delay_s: float = 0.0) -> bool:
        def do(conn: sqlite3.Connection) -> bool:
            now = time.time()
            with transaction(conn):
                row = conn.execute(
                    "SELECT attempts FROM events WHERE id = ? AND lease_token = ?",
                    (self._row_id(lease), lease.receipt),
                ).fetchone()
                if row is None:
                    return False  # lease lost; whoever holds it now decides
                if row[0] >= self.max_attempts:
                    self._move_dead(conn, self._row_id(lease), lease.event, row[0], reason, now)
                    return False
                conn.execute(
                    "UPDATE events SET available_at = ?, lease_token = NULL, leased_by = NULL,"
                    " last_error = ? WHERE id = ?",
                    (now + max(0.0, delay_s), reason[:2000], self._row_id(lease)),
                )
                return True

        return await self._db.run(do)

    async def release(self, lease: Lease, *, delay_s: float = 0.0) -> bool:
        def do(conn: sqlite3.Connection) -> bool:
            # attempts was raised when this delivery was leased; taking it back is what makes
            # the wait free. last_error is kept: it is the reason of the last real failure.
            with transaction(conn):
                cur = conn.execute(
                    "UPDATE events SET available_at = ?, attempts = MAX(attempts - 1, 0),"
                    " lease_token = NULL, leased_by = NULL WHERE id = ? AND lease_token = ?",
                    (time.time() + max(0.0, delay_s), self._row_id(lease), lease.receipt),
                )
            return cur.rowcount == 1

        return await self._db.run(do)

    async def dead_letter(self, lease: Lease, *, reason: str) -> bool:
        def do(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                row = conn.execute(
                    "SELECT attempts FROM events WHERE id = ? AND lease_token = ?",
                    (self._row_id(lease), lease.receipt),
                ).fetchone()
                if row is None:
                    return False
                self._move_dead(conn, self._row_id(lease), lease.event, row[0], reason, time.time())
                return True

        return await self._db.run(do)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        def do(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                "SELECT device_id, seq, payload_hash, envelope, received_at, attempts, reason,"
                " failed_at FROM dead ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            return [
                DeadLetter(QueuedEvent(d, s, bytes(h), bytes(e), r), a, why, f)
                for d, s, h, e, r, a, why, f in rows
            ]

        return await self._db.run(do)

    async def requeue_dead(self, keys: Sequence[str] | None = None) -> list[str]:
        def do(conn: sqlite3.Connection) -> list[str]:
            cols = "id, device_id, seq, payload_hash, envelope, received_at"
            with transaction(conn):
                if keys is None:
                    rows = conn.execute(f"SELECT {cols} FROM dead ORDER BY id").fetchall()
                else:
                    rows = []
                    for key in dict.fromkeys(keys):
                        device_id, _, seq = key.rpartition(":")
                        if not seq.isdigit():
                            continue
                        rows += conn.execute(
                            f"SELECT {cols} FROM dead WHERE device_id = ? AND seq = ?"
                            " ORDER BY id", (device_id, int(seq)),
                        ).fetchall()
                moved: list[str] = []
                for rid, dev, seq, phash, env, received in rows:
                    queued = conn.execute(
                        "SELECT 1 FROM events WHERE device_id = ? AND seq = ?", (dev, seq)
                    ).fetchone()
                    if queued is None:
                        conn.execute(
                            "INSERT INTO events (device_id, seq, payload_hash, envelope,"
                            " received_at, available_at) VALUES (?,?,?,?,?,?)",
                            (dev, seq, phash, env, received, 0.0),
                        )
                        # The dedupe key may have been pruned while it lay dead.
                        conn.execute(
                            "INSERT OR IGNORE INTO seen (device_id, seq, payload_hash,"
                            " received_at) VALUES (?,?,?,?)", (dev, seq, phash, received),
                        )
                        moved.append(f"{dev}:{seq}")
                    conn.execute("DELETE FROM dead WHERE id = ?", (rid,))
            return moved

        return await self._db.run(do)

    async def stats(self) -> QueueStats:
        def do(conn: sqlite3.Connection) -> QueueStats:
            now = time.time()
            ready = conn.execute(
                "SELECT COUNT(*) FROM events WHERE available_at <= ?", (now,)
            ).fetchone()[0]
            leased = conn.execute(
                "SELECT COUNT(*) FROM events WHERE available_at > ? AND lease_token IS NOT NULL",
                (now,),
            ).fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
            seen = conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
            oldest = conn.execute("SELECT MIN(received_at) FROM events").fetchone()[0]
            return QueueStats(ready=ready, leased=leased, dead=dead, seen=seen,
                              oldest_received_at=oldest)

        return await self._db.run(do)

    async def disk_usage(self) -> dict[str, Any]:
        """What the queue takes on disk: the index (with its WAL) and the segment files."""

        def size(path: Path) -> int:
            try:
                return path.stat().st_size
            except FileNotFoundError:  # collected meanwhile
                return 0

        def do() -> dict[str, Any]:
            index = sum(size(p) for p in self.path.parent.glob(self.path.name + "*"))
            segments = [size(p) for _, p in iter_segment_files(self.segments_dir)]
            return {"index_bytes": index, "segments": len(segments),
                    "segment_bytes": sum(segments), "segments_dir": str(self.segments_dir)}

        return await self._db.run(lambda _conn: do())

    async def keys(self) -> list[tuple[str, int]]:
        """Every (device_id, seq) waiting or leased, in order (for tests and inspection)."""

        def do(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            rows = conn.execute("SELECT device_id, seq FROM events ORDER BY id")
            return [(d, s) for d, s in rows]

        return await self._db.run(do)

    async def ping(self) -> None:
        await self._db.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        # Let the group commit finish what was handed to it: each run() below queues behind
        # the drain jobs already scheduled on the database thread.
        while self._draining and not self._db.closed:
            await self._db.run(lambda conn: None)
        try:
            await self._db.run(self._release_writer)
        except RuntimeError:
            pass  # the database was already closed
        finally:
            await self._db.close()
