"""Where finished events go. ``LocalSink`` keeps them on disk: one folder per event plus
index.jsonl.

The outbox (device/outbox.py) is the other sink: it commits events for the uplink to send. Both
hand out the per-device sequence number, persisted before it is used, so a restart never reuses
one.

On-disk layout of a LocalSink directory::

    index.jsonl              one JSON line per event (its meta), appended after the folder exists
    seq                      the last sequence number handed out
    0000000001/meta.json     the event's metadata
    0000000001/frame-0.jpg   key frames
    0000000001/audio.wav     the audio segment (16-bit PCM)
    0000000001/features.npy  the gate's features

Each event folder is written under a temporary name, fsynced and renamed into place, so a power
cut leaves either a whole event or none. Folders are 0700 and files 0600 (edgekeeper/fs.py).

A sink never stops the loop because the disk is full (or went read-only): ``next_seq`` returns
None when it cannot even persist a sequence number (the loop skips that event), ``deliver``
logs and counts an event it cannot write. Both work again as soon as the disk does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from edgekeeper.device.events import Event
from edgekeeper.errors import InputError
from edgekeeper.fs import open_private, private_dir, write_private
from edgekeeper.log import get_logger

log = get_logger(__name__)


class Sink(Protocol):
    async def next_seq(self) -> int | None:
        """The next sequence number, persisted first; None if nothing can be stored now."""
        ...

    async def deliver(self, event: Event) -> None: ...

    async def aclose(self) -> None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalSink:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = asyncio.Lock()
        self._seq: int | None = None
        self.delivered = 0
        self.bytes = 0
        self.lost = 0  # events that could not be written (disk full, read-only)

    def _prepare(self) -> int:
        try:
            private_dir(self.directory)
        except OSError as err:
            raise InputError(
                f"event directory {self.directory} cannot be created: {err.strerror}",
                fix="set sink.directory (or device.state_dir) to a writable folder",
            ) from None
        for stale in self.directory.glob(".tmp-*"):  # a write cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
        seq_file = self.directory / "seq"
        try:
            return int(seq_file.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            raise InputError(
                f"{seq_file} is corrupt (expected an integer)",
                fix="restore it, or set it above the highest event folder number",
            ) from None

    def _persist_seq(self, seq: int) -> None:
        tmp = self.directory / "seq.tmp"
        write_private(tmp, f"{seq}\n".encode())
        os.replace(tmp, self.directory / "seq")

    async def next_seq(self) -> int | None:
        async with self._lock:
            if self._seq is None:
                self._seq = await asyncio.to_thread(self._prepare)
            try:
                await asyncio.to_thread(self._persist_seq, self._seq + 1)
            except OSError as err:
                self._not_stored(err, seq=None)
                return None
            self._seq += 1
            return self._seq

    def _store(self, event: Event) -> None:
        name = f"{event.seq:010d}"
        tmp = self.directory / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write_event(event, tmp, self.directory / name)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written event left behind
            raise

    def _write_event(self, event: Event, tmp: Path, final: Path) -> None:
        private_dir(tmp)
        meta = event.meta()
        write_private(tmp / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        for i, jpeg in enumerate(event.frames):
            write_private(tmp / f"frame-{i}.jpg", jpeg)
        if event.audio_wav is not None:
            write_private(tmp / "audio.wav", event.audio_wav)
        if event.features is not None:
            buf = io.BytesIO()
            np.save(buf, event.features)
            write_private(tmp / "features.npy", buf.getvalue())
        _fsync_dir(tmp)
        if final.exists():  # the same seq delivered again (a retry): replace, not duplicate
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        index_path = self.directory / "index.jsonl"
        with os.fdopen(open_private(index_path, os.O_WRONLY | os.O_APPEND), "ab") as index:
            start = index.seek(0, os.SEEK_END)
            try:
                index.write((json.dumps(meta, sort_keys=True) + "\n").encode())
                index.flush()
                os.fsync(index.fileno())
            except OSError:
                # Never leave a torn line in the index, nor an event it does not list.
                with contextlib.suppress(OSError):
                    index.truncate(start)
                shutil.rmtree(final, ignore_errors=True)
                raise

    async def deliver(self, event: Event) -> None:
        if self._seq is None:
            await asyncio.to_thread(self._prepare)
        try:
            await asyncio.to_thread(self._store, event)
        except OSError as err:
            self._not_stored(err, seq=event.seq)
            return
        self.delivered += 1
        self.bytes += event.payload_bytes

    def _not_stored(self, err: OSError, seq: int | None) -> None:
        self.lost += 1
        log.error("sink.event_not_stored", seq=seq, directory=str(self.directory),
                  error=f"{err.strerror or err}", lost=self.lost,
                  fix="free space on that filesystem; storing resumes by itself")

    async def aclose(self) -> None:
        return None
