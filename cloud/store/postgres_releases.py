"""Releases, device groups and release reports in PostgreSQL (the contract is
cloud/store/releases.py). Mixed into PostgresStore, whose pooled ``_connection`` it uses; the
tables are created with the store's schema (``SCHEMA`` is appended to it)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
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

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS releases (
        id BIGSERIAL PRIMARY KEY,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        scope TEXT NOT NULL,
        rollback BOOLEAN NOT NULL,
        stage TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        published_at DOUBLE PRECISION NOT NULL,
        stage_at DOUBLE PRECISION NOT NULL,
        envelope BYTEA NOT NULL,
        etag TEXT NOT NULL
    )""",
    # One ordinary release per (model, version); a rollback re-publishes an older version.
    "CREATE UNIQUE INDEX IF NOT EXISTS releases_version ON releases (model, version)"
    " WHERE NOT rollback",
    """CREATE TABLE IF NOT EXISTS release_files (
        release_id BIGINT NOT NULL REFERENCES releases (id),
        path TEXT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (release_id, path)
    )""",
    """CREATE TABLE IF NOT EXISTS device_groups (
        device_id TEXT PRIMARY KEY,
        group_name TEXT NOT NULL,
        canary BOOLEAN NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS release_reports (
        id BIGSERIAL PRIMARY KEY,
        device_id TEXT NOT NULL,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        running TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS release_reports_version"
    " ON release_reports (model, version, received_at)",
    "INSERT INTO meta (key, value) VALUES ('releases_version', 0) ON CONFLICT DO NOTHING",
    """CREATE TABLE IF NOT EXISTS device_releases (
        device_id TEXT NOT NULL,
        model TEXT NOT NULL,
        running TEXT,
        version TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device_id, model)
    )""",
]

_BUMP = "UPDATE meta SET value = value + 1 WHERE key = 'releases_version'"
_RELEASE_COLS = ("id, model, version, scope, rollback, stage, created_at, expires_at,"
                 " published_at, stage_at, envelope, etag")


def _release(row: Sequence[Any]) -> ReleaseRecord:
    return ReleaseRecord(int(row[0]), row[1], row[2], row[3], bool(row[4]), row[5], row[6],
                         row[7], row[8], row[9], bytes(row[10]), row[11])


class PostgresReleases:
    # PostgresStore's own: declared here so the mixin type-checks on its own.
    def _connection(self) -> contextlib.AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    async def add_release(self, record: ReleaseRecord, files: Mapping[str, bytes]) -> int:
        import psycopg

        r = record
        try:
            async with self._connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "INSERT INTO releases (model, version, scope, rollback, stage, created_at,"
                    " expires_at, published_at, stage_at, envelope, etag)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
                    (r.model, r.version, r.scope, r.rollback, r.stage, r.created_at,
                     r.expires_at, r.published_at, r.stage_at, r.envelope, r.etag),
                )
                rid = int((await cur.fetchone())[0])
                async with conn.cursor() as c:
                    await c.executemany(
                        "INSERT INTO release_files (release_id, path, data) VALUES (%s,%s,%s)",
                        [(rid, path, data) for path, data in files.items()],
                    )
                await conn.execute(_BUMP)
                return rid
        except psycopg.errors.UniqueViolation:
            raise ReleaseConflict(f"{r.model}@{r.version} is already published",
                                  fix="build the release again with a higher version") from None

    async def releases_version(self) -> int:
        rows = await self._fetchall("SELECT value FROM meta WHERE key = 'releases_version'")
        return int(rows[0][0])

    async def releases(self, model: str | None = None) -> list[ReleaseRecord]:
        if model is None:
            rows = await self._fetchall(f"SELECT {_RELEASE_COLS} FROM releases ORDER BY id")
        else:
            rows = await self._fetchall(
                f"SELECT {_RELEASE_COLS} FROM releases WHERE model = %s ORDER BY id", (model,))
        return [_release(r) for r in rows]

    async def release_file(self, model: str, version: str, path: str) -> bytes | None:
        rows = await self._fetchall(
            "SELECT f.data FROM release_files f JOIN releases r ON r.id = f.release_id"
            " WHERE r.model = %s AND r.version = %s AND f.path = %s ORDER BY r.id DESC LIMIT 1",
            (model, version, path),
        )
        return bytes(rows[0][0]) if rows else None

    async def set_release_stage(self, release_id: int, stage: Stage, *, now: float) -> bool:
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE releases SET stage = %s, stage_at = %s WHERE id = %s AND stage != %s",
                (stage, now, release_id, stage),
            )
            if cur.rowcount != 1:
                return False
            await conn.execute(_BUMP)
            return True

    async def set_device_group(self, device_id: str, group: str, *, canary: bool) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO device_groups (device_id, group_name, canary) VALUES (%s,%s,%s)"
                " ON CONFLICT (device_id) DO UPDATE SET group_name = excluded.group_name,"
                " canary = excluded.canary",
                (device_id, group, canary),
            )
            await conn.execute(_BUMP)

    async def device_group(self, device_id: str) -> str:
        rows = await self._fetchall(
            "SELECT group_name FROM device_groups WHERE device_id = %s", (device_id,))
        return str(rows[0][0]) if rows else ""

    async def device_groups(self) -> list[DeviceGroup]:
        rows = await self._fetchall(
            "SELECT device_id, group_name, canary FROM device_groups ORDER BY device_id")
        return [DeviceGroup(d, g, bool(c)) for d, g, c in rows]

    async def add_release_report(self, report: ReleaseReport) -> None:
        r = report
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO release_reports (device_id, model, version, outcome, reason, at,"
                " received_at, running) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                (r.device_id, r.model, r.version, r.outcome, r.reason, r.at, r.received_at,
                 r.running),
            )
            # The row lock serialises two reports of one device (the state is read, then set).
            cur = await conn.execute(
                "SELECT running FROM device_releases WHERE device_id = %s AND model = %s"
                " FOR UPDATE", (r.device_id, r.model))
            row = await cur.fetchone()
            await conn.execute(
                "INSERT INTO device_releases (device_id, model, running, version, outcome,"
                " reason, at, received_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (device_id, model) DO UPDATE SET running = excluded.running,"
                " version = excluded.version, outcome = excluded.outcome,"
                " reason = excluded.reason, at = excluded.at, received_at = excluded.received_at",
                (r.device_id, r.model, running_after(r, None if row is None else row[0]),
                 r.version, r.outcome, r.reason, r.at, r.received_at),
            )

    async def release_reports(self, model: str, version: str, *,
                              since: float) -> list[ReleaseReport]:
        rows = await self._fetchall(
            "SELECT device_id, model, version, outcome, reason, at, received_at, running"
            " FROM release_reports WHERE model = %s AND version = %s AND received_at >= %s"
            " ORDER BY id", (model, version, since))
        return [ReleaseReport(*row) for row in rows]

    async def device_releases(self, model: str | None = None) -> list[DeviceRelease]:
        sql = ("SELECT device_id, model, running, version, outcome, reason, at, received_at"
               " FROM device_releases")
        args: tuple[str, ...] = ()
        if model is not None:
            sql, args = sql + " WHERE model = %s", (model,)
        rows = await self._fetchall(sql + " ORDER BY device_id, model", args)
        return [DeviceRelease(*row) for row in rows]

