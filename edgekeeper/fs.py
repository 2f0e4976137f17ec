"""Private files and directories: what edgekeeper creates is its owner's alone.

Every directory we create is 0700 and every file 0600, whatever the umask (docs/security.md):
``mkdir(mode=...)`` and ``open(..., mode)`` are filtered by the umask, and ``mkdir(parents=True)``
gives the parents it creates the umask's default, so both are set explicitly here. Directories
and files that already exist keep their mode: they may be the user's own (a home directory).
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path | str) -> Path:
    """Create ``path`` and any missing parent, each 0700; return it."""
    path = Path(path)
    missing: list[Path] = []
    here = path
    while not here.is_dir():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made meanwhile by another process: its mode is its creator's business
        os.chmod(directory, DIR_MODE)
    return path


def open_private(path: Path | str, flags: int = os.O_RDWR) -> int:
    """``os.open`` that creates a missing file 0600 (and its directory 0700); returns the fd."""
    path = Path(path)
    private_dir(path.parent)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return os.open(path, (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_CLOEXEC)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_file(path: Path | str) -> Path:
    """Create ``path`` empty and 0600 unless it exists (e.g. before SQLite opens it: SQLite
    gives its -wal and -shm files the database file's mode); return it."""
    os.close(open_private(path, os.O_RDONLY))
    return Path(path)


def write_private(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600 if new) and fsync it."""
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
