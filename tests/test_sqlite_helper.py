"""edgekeeper/sqlite.py on real SQLite files: one thread per database, a failed COMMIT rolled
back, errors classified with their fix."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from edgekeeper.errors import PermanentError, RetryableError
from edgekeeper.sqlite import (
    Database,
    DatabaseCorrupt,
    DatabaseLocked,
    Pragmas,
    StorageUnwritable,
    transaction,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY);
-- a deferred key is checked at COMMIT: the one way to make a COMMIT fail on demand; here
CREATE TABLE IF NOT EXISTS child (
    id INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED
);
"""


async def test_every_call_runs_on_the_database_thread(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "d" / "x.sqlite", name="test", schema=SCHEMA)
    try:
        threads = {await db.run(lambda conn: threading.get_ident()) for _ in range(5)}
        threads.add(await asyncio.to_thread(db.call, lambda conn: threading.get_ident()))
        # A blocking call made on the database thread itself runs inline instead of waiting
        # for itself.
        threads.add(await db.run(lambda conn: db.call(lambda c: threading.get_ident())))
        assert len(threads) == 1 and threading.get_ident() not in threads
        assert await db.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        assert await db.run(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
    finally:
        await db.close()
    with pytest.raises(RuntimeError, match="not open"):
        await db.run(lambda conn: None)


async def test_a_failed_commit_is_rolled_back(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "x.sqlite", name="test", schema=SCHEMA)

    def orphan(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            conn.execute("INSERT INTO parent (id) VALUES (1)")
            conn.execute("INSERT INTO child (id, parent) VALUES (1, 42)")  # fails at COMMIT

    def adopt(conn: sqlite3.Connection) -> int:
        with transaction(conn):
            conn.execute("INSERT INTO child (id, parent) VALUES (2, NULL)")
        return int(conn.execute("SELECT COUNT(*) FROM parent").fetchone()[0])

    try:
        with pytest.raises(sqlite3.IntegrityError):  # a bug of ours: raised as it is
            await db.run(orphan)
        # Rolled back (the parent row too), and the connection takes new transactions.
        assert not await db.run(lambda conn: conn.in_transaction)
        assert await db.run(adopt) == 0
    finally:
        await db.close()


async def test_a_lock_held_too_long_is_retryable(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    holder = await Database.open(path, name="holder", schema=SCHEMA)
    waiter = await Database.open(path, name="waiter", pragmas=Pragmas(busy_timeout_s=0.1))
    locked, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            conn.execute("INSERT INTO parent (id) VALUES (7)")
            locked.set()
            release.wait(10)

    try:
        held = asyncio.ensure_future(holder.run(hold))
        assert await asyncio.to_thread(locked.wait, 10)
        with pytest.raises(DatabaseLocked) as err:
            await waiter.run(lambda conn: conn.execute("BEGIN IMMEDIATE"))
        assert isinstance(err.value, RetryableError) and "fuser" in (err.value.fix or "")
        release.set()
        await held
    finally:
        release.set()
        await holder.close()
        await waiter.close()


async def test_a_file_that_is_not_a_database_is_permanent(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    path.write_bytes(b"not sqlite at all" * 512)
    with pytest.raises(DatabaseCorrupt) as err:
        await Database.open(path, name="store", schema=SCHEMA, setting="cloud.data_dir")
    assert isinstance(err.value, PermanentError)
    assert f"move {path} aside" in (err.value.fix or "")
    assert not issubclass(DatabaseCorrupt, StorageUnwritable)


def test_an_unwritable_place_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(PermanentError, match="cannot open outbox database") as err:
        Database.open_blocking(blocker / "x.sqlite", name="outbox", setting="outbox.path")
    assert "outbox.path" in (err.value.fix or "")
