"""Releases, device groups and release reports in the embedded store's SQLite file (the
contract is cloud/store/releases.py). Mixed into SQLiteStore, whose ``_db`` it uses."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from edgekeeper.cloud.store.releases import (
    DeviceGroup,
    DeviceRelease,
    ReleaseConflict,
    ReleaseRecord,
    ReleaseReport,
    Stage,
    running_after,
)
from edgekeeper.sqlite import Database, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    scope TEXT NOT NULL,
    rollback INTEGER NOT NULL,
    stage TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    published_at REAL NOT NULL,
    stage_at REAL NOT NULL,
    envelope BLOB NOT NULL,
    etag TEXT NOT NULL
);
-- Versions only go up: one ordinary release per (model, version). A rollback re-publishes an
-- older version's files under that version, so it is exempt.
CREATE UNIQUE INDEX IF NOT EXISTS releases_version ON releases (model, version)
    WHERE rollback = 0;
CREATE TABLE IF NOT EXISTS release_files (
    release_id INTEGER NOT NULL REFERENCES releases (id),
    path TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (release_id, path)
);
CREATE TABLE IF NOT EXISTS device_groups (
    device_id TEXT PRIMARY KEY,
    group_name TEXT NOT NULL,
    canary INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS release_reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    received_at REAL NOT NULL,
    running TEXT
);
CREATE INDEX IF NOT EXISTS release_reports_version
    ON release_reports (model, version, received_at);
INSERT OR IGNORE INTO meta (key, value) VALUES ('releases_version', 0);
CREATE TABLE IF NOT EXISTS device_releases (
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    running TEXT,
    version TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (device_id, model)
)
"""

_RELEASE_COLS = ("id, model, version, scope, rollback, stage, created_at, expires_at,"
                 " published_at, stage_at, envelope, etag")


def _bump(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'releases_version'")


def _release(row: Any) -> ReleaseRecord:
    return ReleaseRecord(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6], row[7],
                         row[8], row[9], bytes(row[10]), row[11])


class SQLiteReleases:
    _db: Database

    async def add_release(self, record: ReleaseRecord, files: Mapping[str, bytes]) -> int:
        r = record

        def do(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                try:
                    cur = conn.execute(
                        "INSERT INTO releases (model, version, scope, rollback, stage, created_at,"
                        " expires_at, published_at, stage_at, envelope, etag)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (r.model, r.version, r.scope, int(r.rollback), r.stage, r.created_at,
                         r.expires_at, r.published_at, r.stage_at, r.envelope, r.etag),
                    )
                except sqlite3.IntegrityError:
                    raise ReleaseConflict(f"{r.model}@{r.version} is already published",
                                          fix="build the release again with a higher version"
                                          ) from None
                rid = int(cur.lastrowid or 0)
                conn.executemany(
                    "INSERT INTO release_files (release_id, path, data) VALUES (?,?,?)",
                    [(rid, path, data) for path, data in files.items()],
                )
                _bump(conn)
                return rid

        return await self._db.run(do)

    async def releases_version(self) -> int:
        def do(conn: sqlite3.Connection) -> int:
            return int(conn.execute(
                "SELECT value FROM meta WHERE key = 'releases_version'").fetchone()[0])

        return await self._db.run(do)

    async def releases(self, model: str | None = None) -> list[ReleaseRecord]:
        def do(conn: sqlite3.Connection) -> list[ReleaseRecord]:
            if model is None:
                rows = conn.execute(f"SELECT {_RELEASE_COLS} FROM releases ORDER BY id")
            else:
                rows = conn.execute(f"SELECT {_RELEASE_COLS} FROM releases WHERE model = ?"
                                    " ORDER BY id", (model,))
            return [_release(r) for r in rows]

        return await self._db.run(do)

    async def release_file(self, model: str, version: str, path: str) -> bytes | None:
        def do(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT f.data FROM release_files f JOIN releases r ON r.id = f.release_id"
                " WHERE r.model = ? AND r.version = ? AND f.path = ? ORDER BY r.id DESC LIMIT 1",
                (model, version, path),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._db.run(do)

    async def set_release_stage(self, release_id: int, stage: Stage, *, now: float) -> bool:
        def do(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cur = conn.execute(
                    "UPDATE releases SET stage = ?, stage_at = ? WHERE id = ? AND stage != ?",
                    (stage, now, release_id, stage),
                )
                if cur.rowcount:
                    _bump(conn)
                return cur.rowcount == 1

        return await self._db.run(do)

    async def set_device_group(self, device_id: str, group: str, *, canary: bool) -> None:
        def do(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT INTO device_groups (device_id, group_name, canary) VALUES (?,?,?)"
                    " ON CONFLICT (device_id) DO UPDATE SET group_name = excluded.group_name,"
                    " canary = excluded.canary",
                    (device_id, group, int(canary)),
                )
                _bump(conn)

        await self._db.run(do)

    async def device_group(self, device_id: str) -> str:
        def do(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT group_name FROM device_groups WHERE device_id = ?",
                               (device_id,)).fetchone()
            return "" if row is None else str(row[0])

        return await self._db.run(do)

    async def device_groups(self) -> list[DeviceGroup]:
        def do(conn: sqlite3.Connection) -> list[DeviceGroup]:
            rows = conn.execute("SELECT device_id, group_name, canary FROM device_groups"
                                " ORDER BY device_id")
            return [DeviceGroup(d, g, bool(c)) for d, g, c in rows]

        return await self._db.run(do)

    async def add_release_report(self, report: ReleaseReport) -> None:
        r = report

        def do(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT INTO release_reports (device_id, model, version, outcome, reason, at,"
                    " received_at, running) VALUES (?,?,?,?,?,?,?,?)",
                    (r.device_id, r.model, r.version, r.outcome, r.reason, r.at, r.received_at,
                     r.running),
                )
                row = conn.execute("SELECT running FROM device_releases WHERE device_id = ?"
                                   " AND model = ?", (r.device_id, r.model)).fetchone()
                conn.execute(
                    "INSERT OR REPLACE INTO device_releases (device_id, model, running, version,"
                    " outcome, reason, at, received_at) VALUES (?,?,?,?,?,?,?,?)",
                    (r.device_id, r.model, running_after(r, None if row is None else row[0]),
                     r.version, r.outcome, r.reason, r.at, r.received_at),
                )

        await self._db.run(do)

    async def release_reports(self, model: str, version: str, *,
                              since: float) -> list[ReleaseReport]:
        def do(conn: sqlite3.Connection) -> list[ReleaseReport]:
            rows = conn.execute(
                "SELECT device_id, model, version, outcome, reason, at, received_at, running"
                " FROM release_reports WHERE model = ? AND version = ? AND received_at >= ?"
                " ORDER BY id", (model, version, since))
            return [ReleaseReport(*row) for row in rows]

        return await self._db.run(do)

    async def device_releases(self, model: str | None = None) -> list[DeviceRelease]:
        def do(conn: sqlite3.Connection) -> list[DeviceRelease]:
            sql = ("SELECT device_id, model, running, version, outcome, reason, at, received_at"
                   " FROM device_releases")
            args: tuple[str, ...] = ()
            if model is not None:
                sql, args = sql + " WHERE model = ?", (model,)
            rows = conn.execute(sql + " ORDER BY device_id, model", args)
            return [DeviceRelease(*row) for row in rows]

        return await self._db.run(do)
