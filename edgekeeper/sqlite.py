"""SQLite for every edgekeeper database: one file, one connection, one thread.

``Database`` opens a file with the project's pragmas (WAL; ``synchronous`` as the caller's
durability needs; a busy timeout; foreign keys), creates it 0600 in a 0700 directory, and runs
every call on one dedicated thread that owns the connection: ``await db.run(fn, ...)`` from
asyncio, ``db.call(fn, ...)`` from plain threads. ``transaction()`` rolls back a failed COMMIT.
sqlite3 errors are classified where they leave ``fn``: a full disk, an I/O error or a lock held
too long become ``RetryableError`` subclasses, a corrupt file a ``PermanentError``, each with
its fix. docs/storage.md says which database uses which settings, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, Literal, ParamSpec, TypeVar

from edgekeeper import errors, fs
from edgekeeper.errors import ConfigError, EdgekeeperError, PermanentError, RetryableError
from edgekeeper.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


class StorageUnwritable(RetryableError, OSError):
    """The filesystem takes no more writes (full, an I/O error, remounted read-only). Nothing
    was written (the transaction was rolled back); writes succeed again once it clears."""


class DiskFull(StorageUnwritable, errors.DiskFull):
    """SQLITE_FULL: no space left for the database to grow into."""


class DiskIOError(StorageUnwritable):
    """SQLITE_IOERR or SQLITE_READONLY: the disk refused a write (or a file size limit did)."""


class DatabaseLocked(RetryableError):
    """Another connection held the write lock for longer than the busy timeout."""


class DatabaseCorrupt(PermanentError):
    """The file is corrupt or not a SQLite database: retrying will not help."""


# SQLite's primary result codes (the low byte of sqlite_errorcode, Python 3.11+) and, for 3.10,
# the messages SQLite has used for them since 3.0.
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26
_TEXTS = {
    "database or disk is full": _FULL,
    "disk I/O error": _IOERR,
    "readonly database": _READONLY,
    "database is locked": _BUSY,
    "database table is locked": _LOCKED,
    "database disk image is malformed": _CORRUPT,
    "file is not a database": _NOTADB,
    "unable to open database file": _CANTOPEN,
}


def error_code(err: sqlite3.Error) -> int | None:
    """The primary SQLite result code of ``err``, or None if it cannot be told."""
    code = getattr(err, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(err)
    return next((c for t, c in _TEXTS.items() if t in text), None)


@dataclass(frozen=True)
class Pragmas:
    """How a database is opened; each user picks what its promise needs (docs/storage.md)."""

    # FULL: a commit returns once the WAL is fsync'd (survives a power cut). NORMAL may lose
    # the last commits on a power cut, never corrupts.
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # Writers from other processes (a worker, the CLI) wait this long for each other.
    busy_timeout_s: float = 10.0
    # Only takes effect when the file is created.
    page_size: int | None = None
    foreign_keys: bool = True
    # WAL pages before an automatic checkpoint (SQLite's default 1000 when None), and the size
    # the WAL file is cut back to after one (kept at its high-water mark when None).
    wal_autocheckpoint: int | None = None
    journal_size_limit: int | None = None


class Database:
    """One SQLite file used through one dedicated thread. Open with ``await Database.open(...)``
    (asyncio) or ``Database.open_blocking(...)`` (a plain thread); close it the same way."""

    def __init__(self, path: Path | str, *, name: str, schema: str = "",
                 pragmas: Pragmas = Pragmas(), setting: str = "the data directory") -> None:
        """``name`` says what the file is in messages ("outbox", "queue"); ``setting`` names
        the configuration key that places it, for the fix of an error opening it."""
        self.path = Path(path)
        self.name = name
        self.pragmas = pragmas
        self._schema = schema
        self._setting = setting
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._thread: int | None = None

    # --- opening and closing ----------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path | str, *, name: str, schema: str = "",
                   pragmas: Pragmas = Pragmas(), setting: str = "the data directory"
                   ) -> Database:
        db = cls(path, name=name, schema=schema, pragmas=pragmas, setting=setting)
        db._start()
        try:
            await asyncio.get_running_loop().run_in_executor(db._executor, db._connect)
        except BaseException:
            db._stop(wait=False)  # its only job is over: the thread ends by itself
            raise
        return db

    @classmethod
    def open_blocking(cls, path: Path | str, *, name: str, schema: str = "",
                      pragmas: Pragmas = Pragmas(), setting: str = "the data directory"
                      ) -> Database:
        db = cls(path, name=name, schema=schema, pragmas=pragmas, setting=setting)
        db._start()
        try:
            db._on_thread(db._connect)
        except BaseException:
            db._stop()
            raise
        return db

    def _start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"sqlite-{self.name}")

    def _stop(self, *, wait: bool = True) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=wait)
            self._executor = None

    def _connect(self) -> None:
        self._thread = threading.get_ident()
        try:
            existed = self.path.exists()
            fs.private_file(self.path)  # SQLite gives its -wal and -shm files this mode
            if existed:
                self._tighten_mode()
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self.pragmas.busy_timeout_s)
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(
                f"cannot open {self.name} database {self.path}: {err}",
                fix=f"check that {self._setting} is a directory this user can write to",
            ) from None
        try:
            self._configure(conn)
            if self._schema:
                with transaction(conn):
                    for statement in _statements(self._schema):
                        conn.execute(statement)
        except sqlite3.Error as err:
            conn.close()
            raise self.classify(err, opening=True) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _tighten_mode(self) -> None:
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077 and self.path.stat().st_uid == os.geteuid():
            # Made by an older version under a loose umask: others must not read it.
            os.chmod(self.path, fs.FILE_MODE)
            log.warning("sqlite.mode_tightened", path=str(self.path), mode=f"{mode:04o}")

    def _configure(self, conn: sqlite3.Connection) -> None:
        p = self.pragmas
        conn.execute(f"PRAGMA busy_timeout = {int(p.busy_timeout_s * 1000)}")
        if p.page_size is not None:
            conn.execute(f"PRAGMA page_size = {int(p.page_size)}")
        # Read first: an existing WAL database is opened without writing to it (a full disk
        # must not stop the outbox from draining itself).
        mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        if mode != "wal":
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            raise ConfigError(
                f"{self.name} database {self.path} cannot use WAL mode (got {mode})",
                fix=f"put {self._setting} on a local filesystem (not NFS/SMB)",
            )
        conn.execute(f"PRAGMA synchronous = {p.synchronous}")
        conn.execute(f"PRAGMA foreign_keys = {'ON' if p.foreign_keys else 'OFF'}")
        if p.wal_autocheckpoint is not None:
            conn.execute(f"PRAGMA wal_autocheckpoint = {int(p.wal_autocheckpoint)}")
        if p.journal_size_limit is not None:
            conn.execute(f"PRAGMA journal_size_limit = {int(p.journal_size_limit)}")

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
        finally:
            self._stop(wait=False)  # its last job is done: the thread ends by itself

    def close_blocking(self) -> None:
        if self._executor is None:
            return
        try:
            self._on_thread(self._disconnect)
        finally:
            self._stop()

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    # --- calls --------------------------------------------------------------------------------

    async def run(self, fn: Callable[Concatenate[sqlite3.Connection, P], T],
                  *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(conn, *args, **kwargs)`` on the database thread, awaited."""
        if self._executor is None:
            raise RuntimeError(f"{self.name} database {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._invoke(fn, *args, **kwargs)
        )

    def call(self, fn: Callable[Concatenate[sqlite3.Connection, P], T],
             *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(conn, *args, **kwargs)`` on the database thread, blocking the calling thread
        (never call this from the event loop). On the database thread itself it runs inline."""
        return self._on_thread(lambda: self._invoke(fn, *args, **kwargs))

    def submit(self, fn: Callable[Concatenate[sqlite3.Connection, P], T],
               *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(conn, *args, **kwargs)`` on the database thread without waiting for
        it (the queue's group commit reschedules itself this way)."""
        if self._executor is None:
            raise RuntimeError(f"{self.name} database {self.path} is not open")
        return self._executor.submit(lambda: self._invoke(fn, *args, **kwargs))

    def _on_thread(self, job: Callable[[], T]) -> T:
        if threading.get_ident() == self._thread:
            return job()
        if self._executor is None:
            raise RuntimeError(f"{self.name} database {self.path} is not open")
        return self._executor.submit(job).result()

    def _invoke(self, fn: Callable[Concatenate[sqlite3.Connection, P], T],
                *args: P.args, **kwargs: P.kwargs) -> T:
        if self._conn is None:
            raise RuntimeError(f"{self.name} database {self.path} is closed")
        try:
            return fn(self._conn, *args, **kwargs)
        except sqlite3.Error as err:
            made = self.classify(err)
            if made is err:
                raise
            raise made from err

    # --- errors -------------------------------------------------------------------------------

    def classify(self, err: sqlite3.Error, *, opening: bool = False) -> Exception:
        """What ``err`` means for the caller: one of the classes above with its fix, or
        ``err`` itself when it is a bug of ours (a constraint, a syntax error)."""
        code = error_code(err)
        where = self.path.parent
        doing = "cannot be opened" if opening else "cannot be written"
        made: EdgekeeperError
        if code == _FULL:
            made = DiskFull(
                f"{self.name} {self.path} {doing}: {err}",
                fix=f"free space on the filesystem holding {where} (df -h {where}); what "
                f"{self.path.name} holds is intact, and writes resume once there is room",
            )
        elif code in (_IOERR, _READONLY):
            made = DiskIOError(
                f"{self.name} {self.path} {doing}: {err}",
                fix=f"free space on the filesystem holding {where} (df -h {where}), or check "
                "it (dmesg) if it is not full: it refused a write (I/O error, read-only, a "
                f"file size limit); what {self.path.name} holds is intact",
            )
        elif code in (_BUSY, _LOCKED):
            made = DatabaseLocked(
                f"{self.name} {self.path} stayed locked by another connection for over "
                f"{self.pragmas.busy_timeout_s:g} s: {err}",
                fix=f"see which process holds it (fuser {self.path}); it is retried",
            )
        elif code in (_CORRUPT, _NOTADB):
            made = DatabaseCorrupt(
                f"{self.name} {self.path} is not a usable SQLite database: {err}",
                fix=f"move {self.path} aside and restart (what it held is lost, unless "
                "`sqlite3 FILE .recover` saves it); it may be corrupt or not ours",
            )
        elif code == _CANTOPEN:
            made = ConfigError(
                f"cannot open {self.name} database {self.path}: {err}",
                fix=f"check that {self._setting} is a directory this user can write to",
            )
        else:
            return err
        return made


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (take the write lock up front: no deadlock on upgrade) ... COMMIT.

    Rolled back on any error, a failed COMMIT included (disk full, I/O error): SQLite may or
    may not have rolled back by itself, and a connection left inside the transaction would
    refuse every later BEGIN.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> Iterator[str]:
    """The statements of ``script`` (a ';' inside a comment or string does not split one)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n\t;"):
                yield pending
            pending = ""
    if pending.strip(" \n\t;"):
        yield pending


__all__ = [
    "Database",
    "DatabaseCorrupt",
    "DatabaseLocked",
    "DiskFull",
    "DiskIOError",
    "Pragmas",
    "StorageUnwritable",
    "error_code",
    "transaction",
]
