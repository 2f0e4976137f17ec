"""One SQLite file used from asyncio, shared by the embedded queue and store.

sqlite3 blocks, so every call runs on ONE dedicated thread that owns the connection: calls are
serialised (SQLite allows one writer anyway), the event loop never waits on disk, and no
connection is shared between threads. The file is in WAL mode with synchronous=FULL: a commit
returns only after the WAL is fsync'd, which is what "202 means durably queued" rests on.
Other processes (a worker, the CLI) may open the same file; ``busy_timeout`` makes writers wait
for each other instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from edgekeeper.errors import ConfigError

T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000


class SQLiteDB:
    def __init__(self, path: Path, schema: str, *, name: str, page_size: int = 4096) -> None:
        self.path = Path(path)
        self._schema = schema
        self._name = name
        self._page_size = page_size
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"sqlite-{self._name}"
        )
        try:
            await self._submit(self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(
                f"cannot open {self._name} database {self.path}: {err}",
                fix="check that cloud.data_dir exists and is writable by this user",
            ) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Only takes effect on a new file, and must come before WAL mode is switched on.
            conn.execute(f"PRAGMA page_size = {int(self._page_size)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(
                    f"{self.path} cannot use WAL mode (got {mode})",
                    fix="put cloud.data_dir on a local filesystem (not NFS)",
                )
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            with transaction(conn):
                for statement in self._schema.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        except sqlite3.DatabaseError as err:
            conn.close()
            raise ConfigError(
                f"{self._name} database {self.path} is not usable: {err}",
                fix=f"move {self.path} aside (it may be corrupt or not an edgekeeper database)",
            ) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self._executor is None:
            raise RuntimeError(f"{self._name} database is not open")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the database thread."""
        def call() -> T:
            if self._conn is None:
                raise RuntimeError(f"{self._name} database is closed")
            return fn(self._conn, *args)

        return await self._submit(call)

    async def close(self) -> None:
        if self._executor is None:
            return

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await self._submit(shut)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (take the write lock up front: no deadlock on upgrade) ... COMMIT."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
