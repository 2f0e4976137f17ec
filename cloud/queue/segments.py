"""Segment files: the bytes of the embedded queue's envelopes, appended beside its index.

A ``SegmentWriter`` appends a batch of records with ``writev`` and one ``fdatasync`` (the index
rows are committed after it), holding an exclusive ``flock`` on its segment while it may append;
``SegmentReader`` reads envelopes back by location; ``scan`` reads every intact record from an
offset, for recovery, and says where a torn tail begins. Why segments, the durability argument
and the record layout are in docs/storage.md.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgekeeper.cloud.queue.base import QueuedEvent
from edgekeeper.errors import PermanentError
from edgekeeper.fs import open_private

MAGIC = b"EKS1"
_PREFIX = struct.Struct(">4sII")  # magic, length, crc32
_FIXED = struct.Struct(">Qd32sB")  # seq, received_at, payload_hash, id_len
PREFIX_BYTES = _PREFIX.size
# A new segment is started once the current one is this big; a sealed segment is deleted once
# no queued event points into it, so the disk holds the backlog plus at most a few of these.
SEGMENT_BYTES = 64 * 1024 * 1024
# macOS has no fdatasync; fsync there is what SQLite's synchronous=FULL uses too (no
# F_FULLFSYNC), so the queue promises the same as before on a laptop.
_datasync = getattr(os, "fdatasync", os.fsync)
# Linux's IOV_MAX is 1024; two buffers per event.
_MAX_IOV = 1024


class SegmentError(PermanentError, OSError):
    """An envelope could not be read back from its segment (missing file, short read).

    Permanent: the bytes are gone, so reading again will not bring them back (the queue
    dead-letters the event with this reason). Also an OSError with its errno, because the
    queue's lease handles it together with the OS's own read errors (os.pread)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message, fix="restore the segment file from a backup; the event it "
                         "held is a dead letter until then")
        self.errno = code


def segment_name(segment_id: int) -> str:
    return f"{segment_id:010d}.seg"


@dataclass(frozen=True)
class Located:
    """Where one envelope lies: segment id, byte offset of the envelope, its length."""

    segment: int
    offset: int
    length: int


def encode_head(event: QueuedEvent) -> bytes:
    """Everything of the record before the envelope (prefix with crc included)."""
    device = event.device_id.encode("ascii")
    fixed = _FIXED.pack(event.seq, event.received_at, event.payload_hash, len(device)) + device
    crc = zlib.crc32(event.envelope, zlib.crc32(fixed))
    return _PREFIX.pack(MAGIC, len(fixed) + len(event.envelope), crc) + fixed


class SegmentWriter:
    """Appends records to one segment this process owns (and holds locked)."""

    def __init__(self, directory: Path, segment_id: int) -> None:
        self.segment_id = segment_id
        self.path = directory / segment_name(segment_id)
        fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stat = os.fstat(fd)
            if stat.st_nlink == 0:  # removed before we locked it: never write to a ghost
                raise FileNotFoundError(errno.ENOENT, "segment removed while opening", self.path)
            self.size = stat.st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        fsync_dir(directory)  # the new file's name must survive a power cut too

    @property
    def closed(self) -> bool:
        return self._fd is None

    def append(self, events: list[QueuedEvent]) -> list[Located]:
        """Append one record per event and fdatasync; return where each envelope lies.

        On any error the segment is cut back to where the batch began (so a half-written batch
        can never sit in front of later records) and the error is raised; if even that fails
        the writer closes itself and the queue starts a new segment.
        """
        assert self._fd is not None, "segment writer is closed"
        start = self.size
        buffers: list[bytes] = []
        located: list[Located] = []
        pos = start
        for ev in events:
            head = encode_head(ev)
            buffers += (head, ev.envelope)
            located.append(Located(self.segment_id, pos + len(head), len(ev.envelope)))
            pos += len(head) + len(ev.envelope)
        try:
            _writev_all(self._fd, buffers)
            _datasync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
                _datasync(self._fd)
            except OSError:
                self.close()
            raise
        self.size = pos
        return located

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def _writev_all(fd: int, buffers: list[bytes]) -> None:
    """writev until every byte is written (writev may write less, and takes <= IOV_MAX)."""
    bufs: list[bytes | memoryview] = list(buffers)
    i, n = 0, len(bufs)
    while i < n:
        if not bufs[i]:
            i += 1
            continue
        written = os.writev(fd, bufs[i : i + _MAX_IOV])
        while written > 0:
            size = len(bufs[i])
            if written >= size:
                written -= size
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[written:]
                written = 0


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentReader:
    """Reads envelopes back by location, keeping the segments it reads open until ``close``
    (the queue closes them after every lease)."""

    def __init__(self, directory: Path, max_open: int = 8) -> None:
        self.directory = directory
        self._max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()

    def read(self, where: Located) -> bytes:
        fd = self._fd(where.segment)
        data = os.pread(fd, where.length, where.offset)
        if len(data) != where.length:
            raise SegmentError(
                errno.EIO,
                f"segment {segment_name(where.segment)} ends before byte "
                f"{where.offset + where.length} (it was cut short or replaced)",
            )
        return data

    def _fd(self, segment: int) -> int:
        fd = self._fds.get(segment)
        if fd is not None:
            self._fds.move_to_end(segment)
            return fd
        path = self.directory / segment_name(segment)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentError(errno.ENOENT, f"segment file {path} is missing") from None
        self._fds[segment] = fd
        while len(self._fds) > self._max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def forget(self, segment: int) -> None:
        fd = self._fds.pop(segment, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class Scanned:
    event: QueuedEvent
    where: Located
    end: int  # offset just past this record


def scan(path: Path, segment_id: int, start: int) -> tuple[list[Scanned], int]:
    """Every whole, intact record from ``start``; and the offset where intact data ends.

    Reads the file sequentially (recovery runs once per crashed writer, on a bounded tail).
    """
    out: list[Scanned] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(start)
        pos = start
        while True:
            prefix = f.read(PREFIX_BYTES)
            if len(prefix) < PREFIX_BYTES:
                break
            magic, length, crc = _PREFIX.unpack(prefix)
            # A length past the end of the file is a record cut short (or garbage): never
            # allocate for more than is there. No other cap: envelopes may be 256 MiB.
            if magic != MAGIC or not _FIXED.size < length <= size - pos - PREFIX_BYTES:
                break
            rest = f.read(length)
            if len(rest) < length or zlib.crc32(rest) != crc:
                break
            seq, received_at, phash, id_len = _FIXED.unpack_from(rest)
            env_start = _FIXED.size + id_len
            if env_start > length:
                break
            try:
                device_id = rest[_FIXED.size : env_start].decode("ascii")
            except UnicodeDecodeError:
                break
            envelope = rest[env_start:]
            event = QueuedEvent(device_id, seq, phash, envelope, received_at)
            where = Located(segment_id, pos + PREFIX_BYTES + env_start, len(envelope))
            pos += PREFIX_BYTES + length
            out.append(Scanned(event, where, pos))
    return out, pos


def try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None if a live writer holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def iter_segment_files(directory: Path) -> Iterator[tuple[int, Path]]:
    for path in directory.glob("*.seg"):
        stem = path.stem
        if stem.isdigit():
            yield int(stem), path
