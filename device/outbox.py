"""The durable outbox: every captured event waits here until the cloud says it is durably queued.

``Outbox`` is one SQLite file (edgekeeper/sqlite.py: WAL, ``synchronous=FULL``, so an event
``put`` has returned for survives kill -9 and a power cut). The capture side takes a sequence
number (``next_seq``) and commits the event (``put``); the uploader ``lease``s the oldest rows,
``delete``s what the cloud queued and ``bury``s what it refused for good (a dead letter, shown
by ``device status``). A lease held by a process that no longer exists is void at once.

The store is bounded by a quota of event bytes: the configured ``quota_bytes``, lowered to what
the disk had room for when the file was opened, a reserve kept so the uploader can always drain
it (docs/storage.md, docs/configuration.md). When a new event does not fit, ``full_policy``
decides (evict the lowest priority, evict the oldest, or reject the new event), and every loss
is counted in ``dropped_total`` and logged. A full disk raises ``OutboxDiskFull`` (nothing was
written; the connection stays usable); events it cost are counted by the next write that works.

``Outbox`` methods block; asyncio code uses ``AsyncOutbox``/``OutboxSink``, which run them on
the outbox's database thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar, runtime_checkable

from edgekeeper.errors import ConfigError, PermanentError, RetryableError
from edgekeeper.log import get_logger
from edgekeeper.sqlite import Database, Pragmas, StorageUnwritable, transaction

if TYPE_CHECKING:  # the protocol package is imported lazily: the outbox only stores bytes
    from edgekeeper.protocol.messages import EventBody

log = get_logger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

FullPolicy = Literal["evict_lowest_priority", "evict_oldest", "reject_new"]
FULL_POLICIES: tuple[FullPolicy, ...] = ("evict_lowest_priority", "evict_oldest", "reject_new")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per device id: the last sequence number handed out.
CREATE TABLE IF NOT EXISTS sequence (
    device_id TEXT PRIMARY KEY,
    last_seq  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY,
    priority     INTEGER NOT NULL,
    created_at   REAL    NOT NULL,
    size         INTEGER NOT NULL,
    body         BLOB    NOT NULL,
    digest       BLOB    NOT NULL,                    -- SHA-256 of body: the payload hash
    tag          TEXT    NOT NULL DEFAULT '',         -- gate model version(s), sealed in clear
    state        TEXT    NOT NULL DEFAULT 'pending',   -- 'pending' | 'dead'
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_until  REAL    NOT NULL DEFAULT 0,
    lease_pid    INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    fallback     INTEGER NOT NULL DEFAULT 0           -- 1 once an edge fallback acted on it
);
CREATE INDEX IF NOT EXISTS events_evict ON events (state, priority, seq);
"""

# Counters kept in `meta` so `device status` can show them after a restart.
# dropped_* counts every event lost to the quota: evicted rows and refused newcomers alike.
_COUNTERS = ("dropped_total", "dropped_bytes", "delivered_total", "buried_total")


class OutboxError(PermanentError):
    """The outbox file cannot be used (it belongs to another device)."""


class OutboxFull(RetryableError):
    """The quota is reached and the policy refuses the new event (or it alone exceeds it)."""


# The outbox's filesystem takes no more writes (full, an I/O error, remounted read-only);
# nothing was written. Retryable: it clears once there is room again. Raised by
# edgekeeper/sqlite.py as DiskFull or DiskIOError; this name is what the uploader catches.
OutboxDiskFull = StorageUnwritable

# The file takes its events' bytes, SQLite's pages around them and the WAL: the quota is at
# most half of the room the outbox found at open, after this reserve, which stays free for
# draining (the -shm file, the WAL of lease and delete transactions, the results ledger).
RESERVE_BYTES = 2 * 1024 * 1024
# The WAL is checkpointed every 256 pages and cut back to 1 MiB, so it never takes more than
# about that from the reserve (SQLite's default lets it grow to 4 MiB and keeps it there).
_PRAGMAS = Pragmas(synchronous="FULL", busy_timeout_s=30.0, wal_autocheckpoint=256,
                   journal_size_limit=1024 * 1024)


def bounded_quota(path: Path, configured: int) -> tuple[int, int]:
    """(quota, free bytes): ``configured``, lowered to half of what the disk holding ``path``
    has room for (its free space plus what the outbox files already take) less the reserve."""
    free = shutil.disk_usage(path.parent).free
    held = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            held += os.stat(f"{path}{suffix}").st_size
    return min(configured, max(0, (free + held - RESERVE_BYTES) // 2)), free


@dataclass(frozen=True)
class OutboxRow:
    """A leased event, ready to be sealed and sent."""

    seq: int
    priority: int
    created_at: float
    body: bytes
    digest: bytes
    tag: str
    attempts: int
    fallback: bool


@dataclass(frozen=True)
class Eviction:
    seq: int
    priority: int
    size: int
    state: str


@dataclass(frozen=True)
class PutResult:
    """What ``put`` did. ``stored`` is False when the new event was itself the one evicted."""

    stored: bool
    evicted: tuple[Eviction, ...] = ()


@dataclass(frozen=True)
class OutboxStats:
    device_id: str
    pending: int
    dead: int
    leased: int
    bytes: int
    quota_bytes: int
    oldest_created_at: float | None
    last_seq: int
    last_upload_at: float | None
    dropped_total: int
    dropped_bytes: int
    delivered_total: int
    buried_total: int

    def oldest_age(self, now: float | None = None) -> float | None:
        if self.oldest_created_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.oldest_created_at)


def _row(r: tuple[Any, ...]) -> OutboxRow:
    return OutboxRow(seq=r[0], priority=r[1], created_at=r[2], body=r[3], digest=r[4], tag=r[5],
                     attempts=r[6], fallback=bool(r[7]))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Outbox:
    """The SQLite outbox of one device. Thread-safe; every method blocks on the disk (its work
    runs on the outbox's database thread)."""

    def __init__(
        self,
        path: str | Path,
        *,
        device_id: str,
        quota_bytes: int = 512 * 1024 * 1024,
        full_policy: FullPolicy = "evict_lowest_priority",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if full_policy not in FULL_POLICIES:
            raise ConfigError(
                f"outbox full_policy {full_policy!r} is not known",
                fix=f"use one of {', '.join(FULL_POLICIES)}",
            )
        if quota_bytes <= 0:
            raise ConfigError(f"outbox quota {quota_bytes} bytes must be > 0", fix="raise quota_mb")
        self.path = Path(path)
        self.device_id = device_id
        self.configured_quota_bytes = int(quota_bytes)
        self.full_policy: FullPolicy = full_policy
        self._clock = clock
        self._lock = threading.Lock()  # guards _lost, which the event loop updates
        self._lost = [0, 0]  # events, bytes lost to a full disk, not yet in dropped_*
        self.db = Database.open_blocking(self.path, name="outbox", schema=_SCHEMA,
                                         pragmas=_PRAGMAS,
                                         setting="outbox.path (or device.state_dir)")
        try:
            self.quota_bytes = self._bound_quota()
            self.db.call(self._claim)
        except BaseException:
            self.db.close_blocking()  # refused: do not leave the file open behind the error
            raise

    # -- setup ---------------------------------------------------------------------------

    def _bound_quota(self) -> int:
        quota, free = bounded_quota(self.path, self.configured_quota_bytes)
        if quota < self.configured_quota_bytes:
            log.warning(
                "outbox.quota_bounded", quota_bytes=quota,
                configured_bytes=self.configured_quota_bytes, free_bytes=free,
                reserve_bytes=RESERVE_BYTES,
                fix="free space on the filesystem holding the outbox, or lower outbox.quota_mb",
            )
        return max(quota, 1)  # 0 would refuse every event as "larger than the whole quota"

    def _claim(self, db: sqlite3.Connection) -> None:
        """Mark a new file as this device's; refuse one that belongs to another device. Writes
        nothing to a file already claimed (a full disk must not stop it from opening)."""
        with transaction(db):
            row = db.execute("SELECT value FROM meta WHERE key='device_id'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('device_id', ?)", (self.device_id,))
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                for name in _COUNTERS:
                    db.execute("INSERT OR IGNORE INTO meta VALUES (?, '0')", (name,))
            elif row[0] != self.device_id:
                # Its events carry the other id; sending them as this device would be refused
                # (or worse, look like a forgery). Say so instead of mixing them.
                raise OutboxError(
                    f"outbox {self.path} belongs to device {row[0]!r}, not {self.device_id!r}",
                    fix=f"set device.id = {row[0]!r}, or point outbox.path at another file",
                )

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` in one write transaction, on the database thread. A full disk raises
        OutboxDiskFull (edgekeeper/sqlite.py classifies it) with everything rolled back."""
        def tx(db: sqlite3.Connection) -> T:
            with transaction(db):
                return fn(db)

        return self.db.call(tx)

    def note_lost(self, size: int) -> None:
        """Count an event that could not be stored (disk full); persisted with the next write
        that succeeds, since the counters live in the same full file."""
        with self._lock:
            self._lost[0] += 1
            self._lost[1] += size

    def close(self) -> None:
        self.db.close_blocking()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- capture side --------------------------------------------------------------------

    def next_seq(self) -> int:
        """Hand out the next sequence number of this device; committed before it is returned."""
        def do(db: sqlite3.Connection) -> int:
            (seq,) = db.execute(
                "INSERT INTO sequence (device_id, last_seq) VALUES (?, 1) "
                "ON CONFLICT (device_id) DO UPDATE SET last_seq = last_seq + 1 "
                "RETURNING last_seq",
                (self.device_id,),
            ).fetchone()
            return int(seq)

        return self._write(do)

    def put(self, body: bytes, seq: int, priority: int = 0, tag: str = "") -> PutResult:
        """Commit one event body. When this returns, the event survives a crash or power cut.

        ``tag`` is what the envelope header carries as the model version; the payload hash is
        computed once here so retries over days do not hash the body again each time.
        """
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise TypeError("outbox bodies are bytes (EventBody.encode())")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ValueError(f"seq must be a positive integer from next_seq(), got {seq!r}")
        body = bytes(body)
        size = len(body)
        if size > self.quota_bytes:
            self._count_refused(seq, priority, size, "larger than the whole quota")
            raise OutboxFull(
                f"event seq={seq} is {size} bytes, more than the outbox quota "
                f"({self.quota_bytes} bytes)",
                fix="raise outbox.quota_mb, or send smaller events (event.thumbnails_only)"
                if self.quota_bytes == self.configured_quota_bytes else
                "free space on the disk holding the outbox (the quota is bounded by it), or "
                "send smaller events (event.thumbnails_only)",
            )
        digest = hashlib.sha256(body).digest()
        with self._lock:
            lost_events, lost_bytes = self._lost
        outcome = self._write(
            lambda db: self._store(db, body, seq, priority, tag, digest, lost_events, lost_bytes)
        )
        if outcome is None:
            return PutResult(stored=True)  # a retried deliver(): already committed
        stored, evicted = outcome
        if lost_events:
            with self._lock:  # now on disk: no longer only in memory
                self._lost[0] -= lost_events
                self._lost[1] -= lost_bytes
            log.warning("outbox.disk_full_losses_recorded", events=lost_events, bytes=lost_bytes)
        for victim in evicted:
            log.warning(
                "outbox.evicted",
                seq=victim.seq,
                priority=victim.priority,
                size=victim.size,
                state=victim.state,
                policy=self.full_policy,
                quota_bytes=self.quota_bytes,
            )
        if not stored and self.full_policy == "reject_new":
            self._count_refused(seq, priority, size, "outbox full, policy reject_new")
            raise OutboxFull(
                f"outbox is full ({self.quota_bytes} bytes); event seq={seq} was not stored",
                fix="restore the cloud link so the backlog drains, raise outbox.quota_mb, or "
                "choose outbox.full_policy = 'evict_lowest_priority'",
            )
        return PutResult(stored=stored, evicted=tuple(evicted))

    def _store(
        self, db: sqlite3.Connection, body: bytes, seq: int, priority: int, tag: str,
        digest: bytes, lost_events: int, lost_bytes: int,
    ) -> tuple[bool, list[Eviction]] | None:
        """Inside put's transaction: make room by policy, insert. None: already stored."""
        existing = db.execute("SELECT body FROM events WHERE seq=?", (seq,)).fetchone()
        if existing is not None:
            if existing[0] == body:
                return None
            raise ValueError(f"seq {seq} is already in the outbox with a different body")
        size = len(body)
        evicted: list[Eviction] = []
        stored = True
        (total,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM events").fetchone()
        now = self._clock()
        while total + size > self.quota_bytes:
            if self.full_policy == "reject_new":
                stored = False
                break
            victim = self._pick_victim(db, now)
            if victim is None:  # nothing left to evict (cannot happen: size <= quota)
                stored = False
                break
            if (
                self.full_policy == "evict_lowest_priority"
                and victim.state == "pending"
                and victim.priority > priority
            ):
                # The newcomer is the least important thing here: it is the one dropped.
                stored = False
                break
            db.execute("DELETE FROM events WHERE seq=?", (victim.seq,))
            total -= victim.size
            evicted.append(victim)
        if stored:
            db.execute(
                "INSERT INTO events (seq, priority, created_at, size, body, digest, tag) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, priority, now, size, body, digest, tag),
            )
        elif self.full_policy != "reject_new":
            evicted.append(Eviction(seq=seq, priority=priority, size=size, state="new"))
        if evicted or lost_events:
            self._bump(db, "dropped_total", len(evicted) + lost_events)
            self._bump(db, "dropped_bytes", sum(e.size for e in evicted) + lost_bytes)
        return stored, evicted

    def _pick_victim(self, db: sqlite3.Connection, now: float) -> Eviction | None:
        # Dead letters go first: they will never be delivered. Then by policy; among equals a
        # row being uploaded right now goes last (evicting it would waste the upload).
        order = (
            "state = 'dead' DESC, priority ASC, lease_until > ? ASC, seq ASC"
            if self.full_policy == "evict_lowest_priority"
            else "state = 'dead' DESC, seq ASC, lease_until > ? ASC"
        )
        row = db.execute(
            f"SELECT seq, priority, size, state FROM events ORDER BY {order} LIMIT 1", (now,)
        ).fetchone()
        if row is None:
            return None
        return Eviction(seq=row[0], priority=row[1], size=row[2], state=row[3])

    def _count_refused(self, seq: int, priority: int, size: int, why: str) -> None:
        def do(db: sqlite3.Connection) -> None:
            self._bump(db, "dropped_total", 1)
            self._bump(db, "dropped_bytes", size)

        self._write(do)
        log.warning("outbox.refused", seq=seq, priority=priority, size=size, reason=why)

    @staticmethod
    def _bump(db: sqlite3.Connection, name: str, by: int) -> None:
        db.execute(
            "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + ? AS TEXT) WHERE key=?",
            (by, name),
        )

    # -- upload side ---------------------------------------------------------------------

    def lease(self, limit: int, lease_seconds: float) -> list[OutboxRow]:
        """Claim up to ``limit`` pending rows, oldest first, for ``lease_seconds``."""
        now = self._clock()

        def do(db: sqlite3.Connection) -> list[Any]:
            # A lease held by a process that died (kill -9) is void now, not when it expires.
            holders = [
                pid
                for (pid,) in db.execute(
                    "SELECT DISTINCT lease_pid FROM events WHERE lease_until > ? AND lease_pid > 0",
                    (now,),
                )
            ]
            for pid in holders:
                if not _pid_alive(pid):
                    db.execute(
                        "UPDATE events SET lease_until = 0, lease_pid = 0 WHERE lease_pid = ?",
                        (pid,),
                    )
            rows = db.execute(
                "SELECT seq, priority, created_at, body, digest, tag, attempts, fallback "
                "FROM events WHERE state = 'pending' AND lease_until <= ? ORDER BY seq LIMIT ?",
                (now, limit),
            ).fetchall()
            if rows:
                db.executemany(
                    "UPDATE events SET lease_until = ?, lease_pid = ? WHERE seq = ?",
                    [(now + lease_seconds, os.getpid(), r[0]) for r in rows],
                )
            return rows

        return [_row(r) for r in self._write(do)]

    def release(self, seq: int, error: str | None = None, *, attempted: bool = True) -> None:
        """Give a leased row back so it is retried, in order. ``attempted=False``: it was
        leased but never sent (the round stopped at an earlier failure)."""
        if attempted:
            self._write(lambda db: db.execute(
                "UPDATE events SET lease_until = 0, lease_pid = 0, attempts = attempts + 1, "
                "last_error = ? WHERE seq = ?",
                (error, seq),
            ))
        else:
            self._write(lambda db: db.execute(
                "UPDATE events SET lease_until = 0, lease_pid = 0 WHERE seq = ?", (seq,)
            ))

    def delete(self, seq: int) -> bool:
        """Forget a row the cloud has durably queued. Only call after its 2xx."""
        return self.delete_many([seq]) == 1

    def delete_many(self, seqs: list[int]) -> int:
        """Forget rows the cloud has queued, in one transaction (one fsync for a whole batch:
        a delete lost to a crash only means one resend, which the cloud answers "duplicate")."""
        if not seqs:
            return 0

        def do(db: sqlite3.Connection) -> int:
            gone = 0
            for seq in seqs:
                gone += db.execute("DELETE FROM events WHERE seq = ?", (seq,)).rowcount
            if gone:
                self._bump(db, "delivered_total", gone)
                db.execute(
                    "INSERT INTO meta VALUES ('last_upload_at', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (repr(self._clock()),),
                )
            return gone

        return self._write(do)

    def bury(self, seq: int, reason: str) -> None:
        """Keep a row the cloud refused for good as a dead letter (visible, never retried)."""
        def do(db: sqlite3.Connection) -> int:
            n = int(db.execute(
                "UPDATE events SET state = 'dead', lease_until = 0, lease_pid = 0, "
                "attempts = attempts + 1, last_error = ? WHERE seq = ? AND state = 'pending'",
                (reason, seq),
            ).rowcount)
            if n:
                self._bump(db, "buried_total", 1)
            return n

        if self._write(do):
            log.error("outbox.dead_letter", seq=seq, reason=reason)

    def fallback_candidates(self, created_before: float, limit: int) -> list[OutboxRow]:
        """Pending events older than ``created_before`` the edge fallback has not acted on."""
        rows = self.db.call(lambda db: db.execute(
            "SELECT seq, priority, created_at, body, digest, tag, attempts, fallback "
            "FROM events WHERE state = 'pending' AND fallback = 0 AND created_at <= ? "
            "ORDER BY seq LIMIT ?",
            (created_before, limit),
        ).fetchall())
        return [_row(r) for r in rows]

    def mark_fallback(self, seq: int) -> None:
        """Remember that the edge fallback already acted on this event (act once)."""
        self._write(lambda db: db.execute("UPDATE events SET fallback = 1 WHERE seq = ?", (seq,)))

    # -- inspection ----------------------------------------------------------------------

    def dead_letters(self) -> list[tuple[int, str | None]]:
        return self.db.call(lambda db: [
            (int(s), e)
            for s, e in db.execute(
                "SELECT seq, last_error FROM events WHERE state = 'dead' ORDER BY seq"
            )
        ])

    def pending_seqs(self) -> list[int]:
        return self.db.call(lambda db: [
            int(s)
            for (s,) in db.execute("SELECT seq FROM events WHERE state = 'pending' ORDER BY seq")
        ])

    def stats(self) -> OutboxStats:
        now = self._clock()

        def do(db: sqlite3.Connection) -> tuple[Any, dict[str, str], Any]:
            counts = db.execute(
                "SELECT COALESCE(SUM(state = 'pending'), 0), COALESCE(SUM(state = 'dead'), 0), "
                "COALESCE(SUM(state = 'pending' AND lease_until > ?), 0), "
                "COALESCE(SUM(size), 0), MIN(CASE WHEN state = 'pending' THEN created_at END) "
                "FROM events",
                (now,),
            ).fetchone()
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            row = db.execute(
                "SELECT last_seq FROM sequence WHERE device_id = ?", (self.device_id,)
            ).fetchone()
            return counts, meta, row

        (pending, dead, leased, total, oldest), meta, row = self.db.call(do)
        last_upload = meta.get("last_upload_at")
        return OutboxStats(
            device_id=self.device_id,
            pending=int(pending),
            dead=int(dead),
            leased=int(leased),
            bytes=int(total),
            quota_bytes=self.quota_bytes,
            oldest_created_at=None if oldest is None else float(oldest),
            last_seq=0 if row is None else int(row[0]),
            last_upload_at=None if last_upload is None else float(last_upload),
            dropped_total=int(meta.get("dropped_total", 0)),
            dropped_bytes=int(meta.get("dropped_bytes", 0)),
            delivered_total=int(meta.get("delivered_total", 0)),
            buried_total=int(meta.get("buried_total", 0)),
        )


class AsyncOutbox:
    """The outbox for asyncio code: each call runs on the outbox's database thread."""

    def __init__(self, outbox: Outbox) -> None:
        self.sync = outbox
        # Set whenever an event is committed, so a waiting uploader wakes without polling.
        self.changed = asyncio.Event()

    async def _on_thread(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        # On the database thread the method's own database calls run inline.
        return await self.sync.db.run(lambda _conn: method(*args, **kwargs))

    async def next_seq(self) -> int:
        return await self._on_thread(self.sync.next_seq)

    async def put(self, body: bytes, seq: int, priority: int = 0, tag: str = "") -> PutResult:
        result = await self._on_thread(self.sync.put, body, seq, priority, tag)
        if result.stored:
            self.changed.set()
        return result

    async def lease(self, limit: int, lease_seconds: float) -> list[OutboxRow]:
        return await self._on_thread(self.sync.lease, limit, lease_seconds)

    async def release(self, seq: int, error: str | None = None, *, attempted: bool = True) -> None:
        await self._on_thread(self.sync.release, seq, error, attempted=attempted)

    async def delete(self, seq: int) -> bool:
        return await self._on_thread(self.sync.delete, seq)

    async def delete_many(self, seqs: list[int]) -> int:
        return await self._on_thread(self.sync.delete_many, seqs)

    async def bury(self, seq: int, reason: str) -> None:
        await self._on_thread(self.sync.bury, seq, reason)

    async def fallback_candidates(self, created_before: float, limit: int) -> list[OutboxRow]:
        return await self._on_thread(self.sync.fallback_candidates, created_before, limit)

    async def mark_fallback(self, seq: int) -> None:
        await self._on_thread(self.sync.mark_fallback, seq)

    async def stats(self) -> OutboxStats:
        return await self._on_thread(self.sync.stats)

    async def close(self) -> None:
        await self.sync.db.close()


def model_tag(meta: dict[str, Any]) -> str:
    """The envelope header's model version: the gate models that decided, ``name@version``."""
    models = meta.get("models")
    if isinstance(models, dict):
        tag = ",".join(str(v) for _, v in sorted(models.items()))
    elif isinstance(models, str):
        tag = models
    else:
        tag = ""
    return tag[:128]  # the header's limit (protocol/envelope.py MAX_TAG)


@runtime_checkable
class _HasBody(Protocol):
    def to_body(self) -> EventBody: ...


class OutboxSink:
    """The device loop's sink when a cloud is configured: events go to the durable outbox.

    Same shape as device/sink.py's ``Sink``: ``next_seq()`` when an event opens, ``deliver()``
    when it is complete (an ``Event`` from device/events.py, or an ``EventBody``), ``aclose()``
    at the end. ``deliver`` returns only after the commit, so "captured" means "on disk".
    """

    def __init__(self, outbox: AsyncOutbox) -> None:
        self.outbox = outbox
        self.lost = 0  # events the disk had no room for

    async def next_seq(self) -> int | None:
        try:
            return await self.outbox.next_seq()
        except OutboxDiskFull as err:
            self._lost(0, None, err)
            return None

    def _lost(self, size: int, seq: int | None, err: OutboxDiskFull) -> None:
        self.lost += 1
        self.outbox.sync.note_lost(size)
        log.error("outbox.event_not_stored", seq=seq, size=size, lost=self.lost,
                  error=err.message, fix=err.fix)

    async def deliver(self, event: EventBody | _HasBody) -> None:
        def encode() -> tuple[bytes, int, int, str]:
            # An Event builds its body here, on the thread (encoding a clip is not free).
            body = event.to_body() if isinstance(event, _HasBody) else event
            return body.encode(), body.seq, body.priority, model_tag(body.meta)

        encoded, seq, priority, tag = await asyncio.to_thread(encode)
        try:
            result = await self.outbox.put(encoded, seq, priority, tag)
        except OutboxFull:
            # Already counted and logged by the outbox (policy reject_new, or an event larger
            # than the quota). Capture goes on: one lost event must not stop the device.
            return
        except OutboxDiskFull as err:
            self._lost(len(encoded), seq, err)
            return
        if not result.stored:
            log.warning("outbox.event_dropped", seq=seq, priority=priority,
                        reason="lowest priority in a full outbox")

    async def aclose(self) -> None:
        """The outbox belongs to whoever opened it (DeviceLink); nothing to release here."""
