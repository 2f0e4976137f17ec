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
cut leaves either a whole event or none.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from edgekeeper.device.events import Event
from edgekeeper.errors import InputError


class Sink(Protocol):
    async def next_seq(self) -> int: ...

    async def deliver(self, event: Event) -> None: ...

    async def aclose(self) -> None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalSink:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = asyncio.Lock()
        self._seq: int | None = None
        self.delivered = 0
        self.bytes = 0

    def _prepare(self) -> int:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
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
        _write(tmp, f"{seq}\n".encode())
        os.replace(tmp, self.directory / "seq")

    async def next_seq(self) -> int:
        async with self._lock:
            if self._seq is None:
                self._seq = await asyncio.to_thread(self._prepare)
            self._seq += 1
            await asyncio.to_thread(self._persist_seq, self._seq)
            return self._seq

    def _store(self, event: Event) -> None:
        name = f"{event.seq:010d}"
        tmp = self.directory / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = event.meta()
        _write(tmp / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        for i, jpeg in enumerate(event.frames):
            _write(tmp / f"frame-{i}.jpg", jpeg)
        if event.audio_wav is not None:
            _write(tmp / "audio.wav", event.audio_wav)
        if event.features is not None:
            buf = io.BytesIO()
            np.save(buf, event.features)
            _write(tmp / "features.npy", buf.getvalue())
        _fsync_dir(tmp)
        final = self.directory / name
        if final.exists():  # the same seq delivered again (a retry): replace, not duplicate
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        with open(self.directory / "index.jsonl", "a", encoding="utf-8") as index:
            index.write(json.dumps(meta, sort_keys=True) + "\n")
            index.flush()
            os.fsync(index.fileno())

    async def deliver(self, event: Event) -> None:
        if self._seq is None:
            await asyncio.to_thread(self._prepare)
        await asyncio.to_thread(self._store, event)
        self.delivered += 1
        self.bytes += event.payload_bytes

    async def aclose(self) -> None:
        return None
