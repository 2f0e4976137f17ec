"""The embedded store: registry, enrolment tokens, sealed results and usage in ``store.sqlite``
(edgekeeper/sqlite.py; docs/storage.md). See base.py for the contract."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekeeper.cloud.store.base import (
    DeviceActivity,
    DeviceRecord,
    EnrollOutcome,
    ProviderState,
    ResultsSince,
    SealedSummary,
    StoredResult,
    UsageRecord,
    UsageRow,
    UsageTotals,
    check_enrollment,
)
from edgekeeper.cloud.store.sqlite_releases import SCHEMA as RELEASES_SCHEMA
from edgekeeper.cloud.store.sqlite_releases import SQLiteReleases
from edgekeeper.cloud.training.examples import (
    EXAMPLE_COLUMNS,
    ExampleCount,
    TrainingExample,
    delete_media,
    example_of_row,
    example_row,
    examples_filter,
    scope_filter,
)
from edgekeeper.protocol.errors import InvalidToken
from edgekeeper.protocol.release import Scope
from edgekeeper.sqlite import Database, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    sign_pk BLOB NOT NULL,
    box_pk BLOB NOT NULL,
    enrolled_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash BLOB PRIMARY KEY,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    created_at REAL NOT NULL,
    acked_at REAL,
    UNIQUE (device_id, seq)
);
CREATE INDEX IF NOT EXISTS results_pending ON results (device_id, id) WHERE acked_at IS NULL;
-- Pruning acked results (prune_results) walks this, oldest ack first, and never scans the
-- table. Partial: unacked results, which are never pruned, are not in it.
CREATE INDEX IF NOT EXISTS results_acked ON results (acked_at) WHERE acked_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('registry_version', 0);
CREATE TABLE IF NOT EXISTS usage (
    call_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    day TEXT NOT NULL,
    reasoner TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_event ON usage (device_id, seq);
-- Running totals per (day, device) and per (day, '*'): a budget check is a point read, not a
-- sum over the day's calls.
CREATE TABLE IF NOT EXISTS usage_daily (
    day TEXT NOT NULL,
    device_id TEXT NOT NULL,
    calls INTEGER NOT NULL,
    events INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    PRIMARY KEY (day, device_id)
) WITHOUT ROWID;
-- What the operator may read of each result, sealed to the operator key (cloud/keys.py); not
-- pruned with the results: it is the cloud's history of what was concluded. result_summaries
-- held it in plaintext in development databases before 2026-12-03: dropped, never migrated.
DROP TABLE IF EXISTS result_summaries;
CREATE TABLE IF NOT EXISTS sealed_summaries (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    produced_at REAL NOT NULL,
    received_at REAL NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX IF NOT EXISTS sealed_summaries_produced ON sealed_summaries (produced_at);
-- Each device's latest heartbeat (metadata only; docs/protocol.md), replaced on each one.
CREATE TABLE IF NOT EXISTS device_heartbeats (
    device_id TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS provider_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    fix TEXT NOT NULL,
    worker TEXT NOT NULL,
    updated_at REAL NOT NULL
)
"""

_SUMMARY_COLS = "device_id, seq, produced_at, received_at, sealed"


def _summary(row: Sequence[Any]) -> SealedSummary:
    d, s, produced, received, sealed = row
    return SealedSummary(str(d), int(s), float(produced), float(received), bytes(sealed))
# Training examples (cloud/training/examples.py): one row per (event, model); features as
# little-endian float32 bytes and their shape. Indexed for a retrain's read (model, time), the
# scope "device:ID", and the media retention (only rows that still have media).
EXAMPLES_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    modality TEXT NOT NULL,
    features BLOB NOT NULL,
    features_shape TEXT NOT NULL,
    scores TEXT NOT NULL,
    gate_label TEXT NOT NULL,
    teacher_label TEXT NOT NULL,
    target TEXT,
    teacher_confidence REAL NOT NULL,
    gate_correct INTEGER,
    reasoner TEXT NOT NULL,
    provisional INTEGER NOT NULL,
    weight REAL NOT NULL,
    captured_at REAL NOT NULL,
    reasoned_at REAL NOT NULL,
    group_name TEXT NOT NULL DEFAULT '',
    media_path TEXT,
    UNIQUE (device_id, seq, model)
);
CREATE INDEX IF NOT EXISTS examples_model_time ON examples (model, reasoned_at);
CREATE INDEX IF NOT EXISTS examples_device ON examples (device_id, model);
CREATE INDEX IF NOT EXISTS examples_media ON examples (reasoned_at) WHERE media_path IS NOT NULL;
"""
_EXAMPLE_SELECT = f"SELECT id, {', '.join(EXAMPLE_COLUMNS)} FROM examples"
MEDIA_BATCH = 500

_USAGE_SUMS = ("input_tokens, output_tokens, cache_write_tokens, cache_read_tokens")

_DEVICE_COLS = "device_id, sign_pk, box_pk, enrolled_at, revoked_at"


def _device(row: tuple[str, bytes, bytes, float, float | None]) -> DeviceRecord:
    return DeviceRecord(row[0], bytes(row[1]), bytes(row[2]), row[3], row[4])


def _insert_summary(conn: sqlite3.Connection, s: SealedSummary) -> None:
    conn.execute(
        f"INSERT OR IGNORE INTO sealed_summaries ({_SUMMARY_COLS}) VALUES (?,?,?,?,?)",
        (s.device_id, s.seq, s.produced_at, s.received_at, s.sealed),
    )


def _bump_registry(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'registry_version'")


class SQLiteStore(SQLiteReleases):  # releases, groups, reports: sqlite_releases.py
    """Store on one SQLite file. Create with ``await SQLiteStore.open(path)``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        schema = ";".join((SCHEMA, EXAMPLES_SCHEMA, RELEASES_SCHEMA))
        return cls(await Database.open(path, name="store", schema=schema,
                                       setting="cloud.data_dir"))

    @property
    def path(self) -> Path:
        return self._db.path

    # registry ---------------------------------------------------------------------------

    async def enroll(
        self, *, token_hash: bytes, device_id: str, sign_pk: bytes, box_pk: bytes, now: float
    ) -> EnrollOutcome:
        def do(conn: sqlite3.Connection) -> EnrollOutcome:
            with transaction(conn):
                tok = conn.execute(
                    "SELECT expires_at, used_at, used_by FROM tokens WHERE token_hash = ?",
                    (token_hash,),
                ).fetchone()
                if tok is None:
                    raise InvalidToken("the enrollment token is not known to this cloud")
                expires_at, used_at, used_by = tok
                row = conn.execute(
                    f"SELECT {_DEVICE_COLS} FROM devices WHERE device_id = ?", (device_id,)
                ).fetchone()
                existing = _device(row) if row is not None else None
                repeated = check_enrollment(
                    existing=existing, used_at=used_at, used_by=used_by, expires_at=expires_at,
                    device_id=device_id, sign_pk=sign_pk, box_pk=box_pk, now=now,
                )
                if repeated is not None:
                    return repeated
                conn.execute(
                    "UPDATE tokens SET used_at = ?, used_by = ? WHERE token_hash = ?",
                    (now, device_id, token_hash),
                )
                if existing is None:
                    conn.execute(
                        "INSERT INTO devices (device_id, sign_pk, box_pk, enrolled_at)"
                        " VALUES (?,?,?,?)",
                        (device_id, sign_pk, box_pk, now),
                    )
                    _bump_registry(conn)
                    return EnrollOutcome.ENROLLED
                return EnrollOutcome.REPEATED

        return await self._db.run(do)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        def do(conn: sqlite3.Connection) -> DeviceRecord | None:
            row = conn.execute(
                f"SELECT {_DEVICE_COLS} FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            return _device(row) if row is not None else None

        return await self._db.run(do)

    async def list_devices(self) -> list[DeviceRecord]:
        def do(conn: sqlite3.Connection) -> list[DeviceRecord]:
            rows = conn.execute(f"SELECT {_DEVICE_COLS} FROM devices ORDER BY device_id")
            return [_device(r) for r in rows]

        return await self._db.run(do)

    async def revoke(self, device_id: str, *, now: float) -> bool:
        def do(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cur = conn.execute(
                    "UPDATE devices SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
                    (now, device_id),
                )
                if cur.rowcount:
                    _bump_registry(conn)
                return cur.rowcount == 1

        return await self._db.run(do)

    async def registry_version(self) -> int:
        def do(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute("SELECT value FROM meta WHERE key = 'registry_version'").fetchone()[0]
            )

        return await self._db.run(do)

    # tokens -----------------------------------------------------------------------------

    async def add_token(self, *, token_hash: bytes, created_at: float, expires_at: float) -> None:
        def do(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT INTO tokens (token_hash, created_at, expires_at) VALUES (?,?,?)",
                    (token_hash, created_at, expires_at),
                )

        await self._db.run(do)

    # results ----------------------------------------------------------------------------

    async def put_result(self, *, device_id: str, seq: int, envelope: bytes, now: float,
                         summary: SealedSummary | None = None) -> int:
        def do(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                cur = conn.execute(
                    "INSERT OR IGNORE INTO results (device_id, seq, envelope, created_at)"
                    " VALUES (?,?,?,?)",
                    (device_id, seq, envelope, now),
                )
                if cur.rowcount == 1 and summary is not None:
                    _insert_summary(conn, summary)
                row = conn.execute(
                    "SELECT id FROM results WHERE device_id = ? AND seq = ?", (device_id, seq)
                ).fetchone()
            return int(row[0])

        return await self._db.run(do)

    async def results_after(self, device_id: str, cursor: int, limit: int) -> list[StoredResult]:
        def do(conn: sqlite3.Connection) -> list[StoredResult]:
            rows = conn.execute(
                "SELECT id, device_id, seq, envelope, created_at FROM results"
                " WHERE device_id = ? AND id > ? AND acked_at IS NULL ORDER BY id LIMIT ?",
                (device_id, cursor, limit),
            ).fetchall()
            return [StoredResult(i, d, s, bytes(e), c) for i, d, s, e, c in rows]

        return await self._db.run(do)

    async def ack_results(self, device_id: str, ids: Sequence[int], *, now: float) -> int:
        def do(conn: sqlite3.Connection) -> int:
            total = 0
            with transaction(conn):
                for rid in ids:
                    cur = conn.execute(
                        "UPDATE results SET acked_at = ? WHERE id = ? AND device_id = ?"
                        " AND acked_at IS NULL",
                        (now, rid, device_id),
                    )
                    total += cur.rowcount
            return total

        return await self._db.run(do)

    async def results_version(self) -> int:
        def do(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM results").fetchone()[0])

        return await self._db.run(do)

    async def results_since(self, version: int) -> ResultsSince:
        def do(conn: sqlite3.Connection) -> ResultsSince:
            # A rowid range (id is the INTEGER PRIMARY KEY): reads only the rows stored since
            # `version`, however large the table. One writer at a time and AUTOINCREMENT make
            # ids visible in increasing order, so nothing below the newest id is still to come.
            rows = conn.execute(
                "SELECT device_id, MAX(id) FROM results WHERE id > ? GROUP BY device_id",
                (version,),
            ).fetchall()
            return ResultsSince(max((int(i) for _, i in rows), default=version),
                                frozenset(str(d) for d, _ in rows))

        return await self._db.run(do)

    async def has_result(self, device_id: str, seq: int) -> bool:
        def do(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "SELECT 1 FROM results WHERE device_id = ? AND seq = ?", (device_id, seq)
            ).fetchone() is not None

        return await self._db.run(do)

    async def prune_results(self, *, acked_before: float, limit: int) -> int:
        def do(conn: sqlite3.Connection) -> int:
            # Batched, so a first prune after months holds the write lock (which the ingest's
            # acks and enrolments wait on) for one short transaction at a time. AUTOINCREMENT
            # ids are never reused, so a pruned id never comes back under a device's cursor.
            with transaction(conn):
                cur = conn.execute(
                    "DELETE FROM results WHERE id IN (SELECT id FROM results"
                    " WHERE acked_at < ? ORDER BY acked_at LIMIT ?)",
                    (acked_before, max(0, limit)),
                )
            return cur.rowcount

        return await self._db.run(do)

    # the operator's view ------------------------------------------------------------------

    async def result_summaries(self, *, device_id: str | None = None, since: float = 0.0,
                               limit: int = 100) -> list[SealedSummary]:
        def do(conn: sqlite3.Connection) -> list[SealedSummary]:
            where = "produced_at >= ?"
            args: list[Any] = [since]
            if device_id is not None:
                where += " AND device_id = ?"
                args.append(device_id)
            rows = conn.execute(
                f"SELECT {_SUMMARY_COLS} FROM sealed_summaries WHERE {where}"
                " ORDER BY produced_at DESC, device_id, seq DESC LIMIT ?",
                (*args, max(0, limit)),
            ).fetchall()
            return [_summary(r) for r in reversed(rows)]

        return await self._db.run(do)

    async def device_activity(self) -> list[DeviceActivity]:
        def do(conn: sqlite3.Connection) -> list[DeviceActivity]:
            devices = [_device(r) for r in conn.execute(
                f"SELECT {_DEVICE_COLS} FROM devices ORDER BY device_id")]
            counts = {d: (n, seen) for d, n, seen in conn.execute(
                "SELECT device_id, COUNT(*), MAX(received_at) FROM sealed_summaries"
                " GROUP BY device_id")}
            # The latest summary per device (SQLite's bare column with MAX picks its row).
            latest = {r[0]: _summary(r[:5]) for r in conn.execute(
                f"SELECT {_SUMMARY_COLS}, MAX(produced_at) FROM sealed_summaries"
                " GROUP BY device_id")}
            beats = {d: (at, body) for d, at, body in conn.execute(
                "SELECT device_id, received_at, body FROM device_heartbeats")}
            return [DeviceActivity(d, counts.get(d.device_id, (0, None))[0],
                                   counts.get(d.device_id, (0, None))[1],
                                   latest.get(d.device_id),
                                   *beats.get(d.device_id, (None, None))) for d in devices]

        return await self._db.run(do)

    async def put_heartbeat(self, device_id: str, *, received_at: float, body: str) -> None:
        def do(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("INSERT OR REPLACE INTO device_heartbeats VALUES (?,?,?)",
                             (device_id, received_at, body))

        await self._db.run(do)

    async def put_provider_state(self, state: ProviderState) -> None:
        def do(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO provider_state"
                    " (id, state, reason, fix, worker, updated_at) VALUES (1,?,?,?,?,?)",
                    (state.state, state.reason, state.fix, state.worker, state.updated_at),
                )

        await self._db.run(do)

    async def provider_state(self) -> ProviderState | None:
        def do(conn: sqlite3.Connection) -> ProviderState | None:
            row = conn.execute("SELECT state, reason, fix, worker, updated_at"
                               " FROM provider_state WHERE id = 1").fetchone()
            return None if row is None else ProviderState(*row)

        return await self._db.run(do)

    # usage ------------------------------------------------------------------------------

    async def record_usage(self, record: UsageRecord) -> bool:
        r = record

        def do(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cur = conn.execute(
                    "INSERT OR IGNORE INTO usage (call_id, device_id, seq, day, reasoner, model,"
                    f" {_USAGE_SUMS}, cost_usd, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (r.call_id, r.device_id, r.seq, r.day, r.reasoner, r.model, r.input_tokens,
                     r.output_tokens, r.cache_write_tokens, r.cache_read_tokens, r.cost_usd,
                     r.created_at),
                )
                if cur.rowcount != 1:
                    return False
                # A second call for the same event (a retry) is another call, not another event.
                first = conn.execute(
                    "SELECT COUNT(*) FROM usage WHERE device_id = ? AND seq = ? AND day = ?",
                    (r.device_id, r.seq, r.day),
                ).fetchone()[0] == 1
                for who in (r.device_id, "*"):
                    conn.execute(
                        "INSERT INTO usage_daily (day, device_id, calls, events,"
                        f" {_USAGE_SUMS}, cost_usd) VALUES (?,?,1,?,?,?,?,?,?)"
                        " ON CONFLICT (day, device_id) DO UPDATE SET calls = calls + 1,"
                        " events = events + excluded.events,"
                        " input_tokens = input_tokens + excluded.input_tokens,"
                        " output_tokens = output_tokens + excluded.output_tokens,"
                        " cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,"
                        " cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,"
                        " cost_usd = cost_usd + excluded.cost_usd",
                        (r.day, who, int(first), r.input_tokens, r.output_tokens,
                         r.cache_write_tokens, r.cache_read_tokens, r.cost_usd),
                    )
                return True

        return await self._db.run(do)

    async def usage_totals(self, *, day: str, device_id: str | None = None) -> UsageTotals:
        def do(conn: sqlite3.Connection) -> UsageTotals:
            row = conn.execute(
                f"SELECT calls, {' + '.join(_USAGE_SUMS.split(', '))}, cost_usd FROM usage_daily"
                " WHERE day = ? AND device_id = ?",
                (day, "*" if device_id is None else device_id),
            ).fetchone()
            return UsageTotals(0, 0, 0.0) if row is None else UsageTotals(*row)

        return await self._db.run(do)

    async def usage_by_day(self, *, since_day: str,
                           device_id: str | None = None) -> list[UsageRow]:
        def do(conn: sqlite3.Connection) -> list[UsageRow]:
            sql = (f"SELECT day, device_id, calls, events, {_USAGE_SUMS}, cost_usd"
                   " FROM usage_daily WHERE day >= ? AND device_id ")
            args: tuple[str, ...] = (since_day,)
            if device_id is None:
                sql += "!= '*'"
            else:
                sql += "= ?"
                args += (device_id,)
            rows = conn.execute(sql + " ORDER BY day, device_id", args).fetchall()
            return [UsageRow(*row) for row in rows]

        return await self._db.run(do)

    # training examples ------------------------------------------------------------------

    async def add_example(self, example: TrainingExample) -> int | None:
        def do(conn: sqlite3.Connection) -> int | None:
            with transaction(conn):
                cur = conn.execute(
                    f"INSERT OR IGNORE INTO examples ({', '.join(EXAMPLE_COLUMNS)})"
                    f" VALUES ({', '.join('?' * len(EXAMPLE_COLUMNS))})", example_row(example))
            return cur.lastrowid if cur.rowcount == 1 else None

        return await self._db.run(do)

    async def examples(self, *, model: str, scope: Scope, since: float | None = None,
                       until: float | None = None, limit: int = 100_000
                       ) -> list[TrainingExample]:
        where, params = examples_filter(model, scope, since, until)
        sql = f"{_EXAMPLE_SELECT} WHERE {where}"

        def do(conn: sqlite3.Connection) -> list[TrainingExample]:
            rows = conn.execute(sql + " ORDER BY reasoned_at, id LIMIT ?", (*params, limit))
            return [example_of_row(r) for r in rows]

        return await self._db.run(do)

    async def examples_by_ids(self, ids: Sequence[int]) -> list[TrainingExample]:
        wanted = json.dumps(sorted({int(i) for i in ids}))

        def do(conn: sqlite3.Connection) -> list[TrainingExample]:
            rows = conn.execute(f"{_EXAMPLE_SELECT} WHERE id IN (SELECT value FROM"
                                " json_each(?)) ORDER BY id", (wanted,))
            return [example_of_row(r) for r in rows]

        return await self._db.run(do)

    async def forget_media(self, *, before: float) -> int:
        def batch(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            return conn.execute(
                "SELECT id, media_path FROM examples WHERE media_path IS NOT NULL"
                " AND reasoned_at < ? ORDER BY reasoned_at LIMIT ?", (before, MEDIA_BATCH)
            ).fetchall()

        def clear(conn: sqlite3.Connection, ids: list[int]) -> None:
            with transaction(conn):
                conn.execute("UPDATE examples SET media_path = NULL WHERE id IN"
                             " (SELECT value FROM json_each(?))", (json.dumps(ids),))

        total = 0
        while rows := await self._db.run(batch):
            # Files first, then the paths: a crash in between leaves a path to nothing, which
            # the next run clears, never a file no row names.
            await asyncio.to_thread(delete_media, [p for _, p in rows])
            await self._db.run(clear, [i for i, _ in rows])
            total += len(rows)
        return total

    async def example_counts(self, *, model: str | None, scope: Scope) -> list[ExampleCount]:
        where, args = scope_filter(scope)
        if model is not None:
            where += " AND model = ?"
            args += (model,)

        def do(conn: sqlite3.Connection) -> list[ExampleCount]:
            rows = conn.execute(
                "SELECT model, device_id, reasoner, target, gate_correct, provisional,"
                " COUNT(*), SUM(weight > 0) FROM examples WHERE " + where
                + " GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3", args).fetchall()
            return [ExampleCount(m, d, r, t, None if g is None else bool(g), bool(p), n, w)
                    for m, d, r, t, g, p, n, w in rows]

        return await self._db.run(do)

    async def count_new_examples(self, *, model: str, scope: Scope, after: float | None
                                 ) -> tuple[int, float | None]:
        where, params = examples_filter(model, scope, None, None)
        if after is not None:
            where, params = where + " AND reasoned_at > ?", (*params, after)
        sql = ("SELECT COUNT(*) FILTER (WHERE target IS NOT NULL AND weight > 0),"
               f" MAX(reasoned_at) FROM examples WHERE {where}")

        def do(conn: sqlite3.Connection) -> tuple[int, float | None]:
            usable, newest = conn.execute(sql, params).fetchone()
            return int(usable), None if newest is None else float(newest)

        return await self._db.run(do)

    async def ping(self) -> None:
        await self._db.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._db.close()
